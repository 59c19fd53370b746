"""Packing whole documents into fixed-length windows.

A token cache (jaxlm.data.token_cache) is the stream `EOS doc_0 EOS doc_1 ... EOS`; a
document's unit is its leading EOS plus its tokens. Packing cuts the stream into windows
of at most L tokens that never split a unit (except one longer than L, which is cut into
pieces of L, each its own segment), filled greedily in stream order. Inside a window every
unit is one segment (ids from 1) with positions from 0, so attention never crosses a
document; the rest is padding (segment 0).
"""

from __future__ import annotations

import numpy as np


def pack_windows(doc_starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Window boundaries (stream offsets, [W + 1]) of greedy next-fit packing in stream
    order, and the number of documents longer than seq_len (cut into pieces of seq_len).

    Every window ends where a document (or a piece) ends, so the windows partition the
    stream and window w is the contiguous range [bounds[w], bounds[w+1]).
    """
    lengths = np.diff(doc_starts)  # leading EOS + tokens, per document
    bounds, fill, start = [0], 0, 0
    for n in lengths.tolist():
        while n > 0:
            piece = min(n, seq_len)
            if fill + piece > seq_len:  # close the current window
                bounds.append(start)
                fill = 0
            fill += piece
            start += piece
            n -= piece
    bounds.append(start)
    return np.asarray(bounds, np.int64), int(np.sum(lengths > seq_len))


def segments_and_positions(start: int, end: int, doc_starts: np.ndarray,
                           seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (from 1) and positions (from 0 in each document or piece) of the stream
    range [start, end), which `pack_windows` made a window."""
    offsets = np.arange(start, end)
    doc = np.searchsorted(doc_starts, offsets, side="right") - 1
    positions = (offsets - doc_starts[doc]) % seq_len  # 0 where a document or piece starts
    return np.cumsum(positions == 0).astype(np.int32), positions.astype(np.int32)
