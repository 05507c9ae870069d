"""The names of the events of a trigger_crash_dump instance action, in the order they run.

The first is Nova's; the three after it are crashlab's, following the dump
that the NMI caused (app/follower.py).
"""

CRASH_DUMP_EVENT = "compute_trigger_crash_dump"
OBSERVE_PANIC_EVENT = "crashlab_observe_panic"
COLLECT_DUMP_EVENT = "crashlab_collect_dump"
VERIFY_DUMP_EVENT = "crashlab_verify_dump"
FOLLOW_EVENTS = (OBSERVE_PANIC_EVENT, COLLECT_DUMP_EVENT, VERIFY_DUMP_EVENT)
