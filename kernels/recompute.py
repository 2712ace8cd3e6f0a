"""Recompute regions around the scan: everything of a region but the scan runs again in the backward.

A region is run twice: first without grad, when every scan in it keeps its training outputs (output, y_pre,
checkpoints, records) in a `ScanOutputs`; then, in the backward, with grad, when each scan hands back what it kept
(no kernel launch) through an autograd node over the recomputed inputs. Only the scans' outputs live between the
forward and the backward pass; their inputs are recomputed.
"""
import contextlib
import threading

__all__ = ["ScanOutputs", "keep_scan_outputs", "current_region"]


class ScanOutputs:
    """The outputs of the scans run inside one recompute region (`keep_scan_outputs`), in call order."""

    def __init__(self):
        self.kept = []
        self.recorded = False   # the region has run once: its scans now hand back what they kept
        self.next = 0


class _Regions(threading.local):
    def __init__(self):
        self.stack = []     # the ScanOutputs of the regions being run on this thread, innermost last


_REGIONS = _Regions()


def current_region():
    """The ScanOutputs of the innermost region being run on this thread, or None."""
    return _REGIONS.stack[-1] if _REGIONS.stack else None


@contextlib.contextmanager
def keep_scan_outputs(store: ScanOutputs):
    """Run a region (see the module docstring): the first run keeps every scan's outputs in `store`, a later run
    replays them."""
    store.next = 0
    _REGIONS.stack.append(store)
    try:
        yield store
    finally:
        _REGIONS.stack.pop()
        store.recorded = True
