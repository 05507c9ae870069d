"""The names of crashlab's instance actions' events, in the order they run.

A trigger_crash_dump's first event is Nova's; the three after it are
crashlab's, following the dump that the NMI caused (app/follower.py). A
host-side memory capture (app/capture.py) is an action of its own, with its
capture event and then the verify event.
"""

CRASH_DUMP_EVENT = "compute_trigger_crash_dump"
OBSERVE_PANIC_EVENT = "crashlab_observe_panic"
COLLECT_DUMP_EVENT = "crashlab_collect_dump"
VERIFY_DUMP_EVENT = "crashlab_verify_dump"
FOLLOW_EVENTS = (OBSERVE_PANIC_EVENT, COLLECT_DUMP_EVENT, VERIFY_DUMP_EVENT)

CAPTURE_ACTION = "crashlab_capture_memory_dump"
CAPTURE_EVENT = "crashlab_capture_memory_dump"
