"""Routing traces: the native format (reader, writer, checks), importers, generator, statistics.

The format's specification is `traces/FORMAT.md`; the command-line tool is
`python -m lynx_sim.traces {convert,synth,stats}`.
"""

from .errors import TraceFormatError
from .format import FORMAT_VERSION, TraceMeta
from .reader import Trace, open_trace
from .arrays import TraceArrays
from .writer import TraceWriter, write_trace

__all__ = ["FORMAT_VERSION", "Trace", "TraceArrays", "TraceFormatError", "TraceMeta", "TraceWriter", "open_trace", "write_trace"]
