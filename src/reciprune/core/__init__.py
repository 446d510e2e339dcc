"""Lifecycle session, events, hooks and module targeting."""

from reciprune.core.events import Event, EventType
from reciprune.core.session import LifecycleSession

__all__ = ["Event", "EventType", "LifecycleSession"]
