"""Interrupting a handler thread that ran past its hard timeout."""

from __future__ import annotations

import ctypes


def interrupt_thread(thread_ident: int, exception: type[BaseException]) -> bool:
    """Raise ``exception`` inside the thread at its next Python bytecode.

    A thread blocked inside a C call (a socket read, ``time.sleep``) only sees it when the
    call returns; the worker stops waiting for it either way and counts it as abandoned.
    Returns True when the exception was scheduled.
    """
    scheduled = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_ident), ctypes.py_object(exception)
    )
    if scheduled > 1:  # more than one thread state matched: undo, as the C API asks
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_ident), None)
        return False
    return bool(scheduled == 1)
