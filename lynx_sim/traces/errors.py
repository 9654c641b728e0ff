"""The one error type trace code raises for bad input: it names file, field, expected, found."""

from __future__ import annotations


class TraceFormatError(ValueError):
    """A trace file (or array set) that does not follow `traces/FORMAT.md`.

    The message always reads ``<file>: field '<field>': expected <expected>, found <found>`` so
    that a user can fix the producer without reading our code.
    """

    def __init__(self, file: str, field: str, expected: str, found: str):
        self.file, self.field, self.expected, self.found = str(file), field, expected, found
        super().__init__(f"{self.file}: field '{field}': expected {expected}, found {found}")
