"""Argument types for the scripts' command lines: a bad value is an argparse error naming the flag
(exit 2), before any work starts or anything is deleted."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: users, days, requests, concurrency, k)."""
    value = int_of(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds)."""
    value = int_of(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    value = int_of(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 1-65535, got {value}")
    return value


def int_of(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
