"""Index plans for the class-blocked sparse convolution kernels.

A structured-sparse conv weight is described by its *taps*: entry ``e`` connects output
channel ``row[e]`` to input channel ``col[e]`` at kernel offset ``(dy[e], dx[e])`` with the
weight element ``widx[e]`` of the layer's flat parameter. :class:`ClassPlan` groups rows with
identical tap lists into classes and fixes the packed weight order the C kernels read.
:class:`Grid` fixes where every pixel vector lives in the padded input and output buffers
for one input size; see ``sparse_rows.c`` for the memory layout. :class:`PhaseGrid` does the
same for a stride-2 call, run as a stride-1 convolution of the input's phase planes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TapPattern", "ClassPlan", "Grid", "PhaseGrid", "row_groups"]


def row_groups(count: int) -> list[int]:
    """Sizes of the row groups of a class, as sparse_rows.c takes them: 4s, then 2, then 1."""
    sizes = [4] * (count // 4)
    rest = count % 4
    return sizes + ([2] if rest >= 2 else []) + ([1] if rest % 2 else [])


@dataclass(frozen=True)
class TapPattern:
    """The nonzero taps of a ``[rows, cols, k, k]`` weight (all arrays int64, same length)."""

    row: np.ndarray
    col: np.ndarray
    dy: np.ndarray
    dx: np.ndarray
    widx: np.ndarray
    rows: int
    cols: int
    kernel: int

    def transposed(self) -> "TapPattern":
        """Taps of the input-gradient convolution: rows and columns swapped, kernel flipped."""
        k = self.kernel
        return TapPattern(self.col, self.row, k - 1 - self.dy, k - 1 - self.dx, self.widx,
                          self.cols, self.rows, k)

    def polyphase(self) -> "TapPattern":
        """Taps of the same convolution at stride 2, rewritten as a stride-1 convolution of
        ``F.pixel_unshuffle(x, 2)``: channel ``c * 4 + a * 2 + b`` of that input holds
        ``x[c, 2u + a, 2v + b]``, so tap ``(c, dy, dx)`` reads phase channel
        ``c * 4 + (dy % 2) * 2 + dx % 2`` at offset ``(dy // 2, dx // 2)`` of a
        ``ceil(kernel / 2)`` kernel. Distinct taps stay distinct; ``widx`` is unchanged."""
        col = self.col * 4 + (self.dy % 2) * 2 + self.dx % 2
        return TapPattern(self.row, col, self.dy // 2, self.dx // 2, self.widx,
                          self.rows, self.cols * 4, (self.kernel + 1) // 2)


def _classes(taps: TapPattern):
    """Taps sorted by (row, col, dy, dx), each row's start in that order, and the classes:
    lists of rows with identical (col, dy, dx) lists, in order of first row."""
    order = np.lexsort((taps.dx, taps.dy, taps.col, taps.row))
    row, col, dy, dx, widx = (np.asarray(a, dtype=np.int64)[order]
                              for a in (taps.row, taps.col, taps.dy, taps.dx, taps.widx))
    starts = np.searchsorted(row, np.arange(taps.rows + 1))
    classes: dict[bytes, list[int]] = {}
    for r in range(taps.rows):
        s, e = starts[r], starts[r + 1]
        if e > s:
            classes.setdefault(np.stack([col[s:e], dy[s:e], dx[s:e]]).tobytes(), []).append(r)
    return row, col, dy, dx, widx, starts, list(classes.values())


class ClassPlan:
    """Rows grouped into classes of identical tap lists, with the packed weight order.

    Packed order: class by class; inside a class, rows in the groups of :func:`row_groups`,
    each group stored tap-major. ``pack_index[i]`` is the flat weight
    index stored at packed position ``i``; every weight element appears exactly once.
    """

    def __init__(self, taps: TapPattern):
        row, col, dy, dx, widx, starts, classes = _classes(taps)
        member_ptr, members, tap_ptr, offsets, pack = [0], [], [0], [], []
        tap_cols, tap_dy, tap_dx = [], [], []
        packed = 0
        for rows in classes:
            s, e = starts[rows[0]], starts[rows[0] + 1]
            tap_cols.append(col[s:e])
            tap_dy.append(dy[s:e])
            tap_dx.append(dx[s:e])
            tap_ptr.append(tap_ptr[-1] + (e - s))
            members.extend(rows)
            member_ptr.append(len(members))
            offsets.append(packed)
            block = np.stack([widx[starts[r]:starts[r + 1]] for r in rows])  # [members, taps]
            m = 0
            for g in row_groups(len(rows)):
                pack.append(block[m:m + g].T.reshape(-1))
                m += g
            packed += block.size
        empty = np.zeros(0, np.int64)
        self.rows, self.cols, self.kernel = taps.rows, taps.cols, taps.kernel
        self.n_classes = len(classes)
        self.covers_all_rows = len(members) == taps.rows  # else some output planes stay zero
        self.member_ptr = torch.tensor(member_ptr, dtype=torch.int64)
        self.members = torch.tensor(members, dtype=torch.int64)
        self.tap_ptr = torch.tensor(tap_ptr, dtype=torch.int64)
        self.tap_col = np.concatenate(tap_cols) if classes else empty
        self.tap_dy = np.concatenate(tap_dy) if classes else empty
        self.tap_dx = np.concatenate(tap_dx) if classes else empty
        self.weight_offset = torch.tensor(offsets, dtype=torch.int64)
        self.pack_index = torch.from_numpy(np.concatenate(pack) if pack else empty)
        self._offsets: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def offsets(self, in_plane: int, in_pitch: int, out_plane: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Element offsets inside one sample: of every tap in the input buffer and of every
        class member's plane in the output buffer (cached per buffer geometry)."""
        key = (in_plane, in_pitch, out_plane)
        if key not in self._offsets:
            taps = self.tap_col * in_plane + self.tap_dy * in_pitch + self.tap_dx
            self._offsets[key] = (torch.from_numpy(taps.astype(np.int64)), self.members * out_plane)
        return self._offsets[key]


@dataclass(frozen=True)
class Grid:
    """Buffer geometry of one stride-1 convolution call on an ``[N, C, h, w]`` input.

    The input buffer is ``[N, C, in_rows, pitch]`` with the image at ``(pad, pad)`` and zeros
    around; the output buffer is ``[N, C, out_len]``. Pixel vector ``q`` (``lanes`` elements)
    is read at ``ib[q]`` and written at ``ob[q]``. ``flat`` grids run along whole padded rows
    (garbage columns are computed and dropped), row grids round each output row up to whole
    vectors; :func:`Grid.build` picks whichever wastes fewer lanes.
    """

    h: int
    w: int
    pad: int
    h_out: int
    w_out: int
    pitch: int
    in_rows: int
    out_len: int
    out_pitch: int
    flat: bool
    ib: torch.Tensor
    ob: torch.Tensor

    @staticmethod
    def build(h: int, w: int, kernel: int, pad: int, lanes: int) -> "Grid":
        h_out, w_out = h + 2 * pad - kernel + 1, w + 2 * pad - kernel + 1
        w_vec = -(-w_out // lanes) * lanes
        pitch_flat = w + 2 * pad
        n_flat = -(-(h_out * pitch_flat) // lanes)
        if n_flat * lanes <= h_out * w_vec:
            q = torch.arange(n_flat, dtype=torch.int64) * lanes
            last = n_flat * lanes - 1 + (kernel - 1) * (pitch_flat + 1)
            in_rows = max(h + 2 * pad, last // pitch_flat + 1)
            return Grid(h, w, pad, h_out, w_out, pitch_flat, in_rows, n_flat * lanes, pitch_flat, True, q, q)
        per_row = w_vec // lanes
        pitch = w_vec + kernel - 1
        q = torch.arange(h_out * per_row, dtype=torch.int64)
        r, c = q // per_row, (q % per_row) * lanes
        return Grid(h, w, pad, h_out, w_out, pitch, h_out + kernel - 1, h_out * w_vec, w_vec, False,
                    r * pitch + c, r * w_vec + c)

    @property
    def nvec(self) -> int:
        return self.ib.numel()

    @property
    def in_plane(self) -> int:
        return self.in_rows * self.pitch

    def input_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` placed in a zero-padded contiguous buffer (``x`` itself when no padding is needed)."""
        n, c = x.shape[:2]
        if self.pad == 0 and self.pitch == self.w and self.in_rows == self.h:
            return x.contiguous()
        p = self.pad
        return F.pad(x, (p, self.pitch - self.w - p, p, self.in_rows - self.h - p)).contiguous()

    def output_view(self, buf: torch.Tensor) -> torch.Tensor:
        """The ``[N, C, h_out, w_out]`` image inside an output buffer ``[N, C, out_len]``."""
        n, c = buf.shape[:2]
        if self.out_len == self.h_out * self.w_out and self.out_pitch == self.w_out:
            return buf.view(n, c, self.h_out, self.w_out)
        used = buf[:, :, : self.h_out * self.out_pitch].reshape(n, c, self.h_out, self.out_pitch)
        return used[..., : self.w_out].contiguous()

    def output_buffer(self, g: torch.Tensor) -> torch.Tensor:
        """An output-gradient image placed in the output grid, zeros in every unused lane."""
        n, c = g.shape[:2]
        if self.out_len == self.h_out * self.w_out and self.out_pitch == self.w_out:
            return g.contiguous().view(n, c, self.out_len)
        buf = g.new_zeros(n, c, self.out_len)
        used = buf[:, :, : self.h_out * self.out_pitch].view(n, c, self.h_out, self.out_pitch)
        used[..., : self.w_out] = g
        return buf


@dataclass(frozen=True)
class PhaseGrid(Grid):
    """Buffer geometry of one stride-2 convolution call, run as a stride-1 convolution of the
    input's phase planes (polyphase split, :meth:`TapPattern.polyphase`).

    Source channel ``c`` of the ``[N, C, src_h, src_w]`` input becomes channels ``4c + 2a + b``
    holding the padded input at ``(2u + a, 2v + b)``. The inherited fields describe the
    stride-1 ``ceil(k / 2)`` kernel with padding 0 on that ``[h_out + 1, w_out + 1]`` phase
    image (for k = 3): its padded sides ``2 * (out + 1)`` cover ``side + 2 * pad``, with one
    extra zero row or column when ``side + 2 * pad`` is odd. :meth:`input_buffer` gathers the
    input straight into the kernel's buffer layout: ``gather`` indexes an input plane with one
    zero appended (index ``src_h * src_w`` for every padding position). ``back`` is the
    input-gradient grid on the ``[h_out, w_out]`` output gradient, and ``unphase`` maps every
    input pixel to its place in that grid's output buffer.
    """

    src_h: int
    src_w: int
    gather: torch.Tensor
    back: Grid
    unphase: torch.Tensor

    @staticmethod
    def build(h: int, w: int, kernel: int, pad: int, lanes: int) -> "PhaseGrid":
        if kernel % 2 == 0:
            raise ValueError(f"the stride-2 polyphase grid needs an odd kernel, got {kernel}")
        kp = (kernel + 1) // 2
        h_out, w_out = (h + 2 * pad - kernel) // 2 + 1, (w + 2 * pad - kernel) // 2 + 1
        inner = Grid.build(h_out + kp - 1, w_out + kp - 1, kp, 0, lanes)
        back = Grid.build(h_out, w_out, kp, kp - 1, lanes)
        phase, r, c = torch.meshgrid(torch.arange(4), torch.arange(inner.in_rows), torch.arange(inner.pitch),
                                     indexing="ij")
        y, x = 2 * r + phase // 2 - pad, 2 * c + phase % 2 - pad
        outside = (y < 0) | (y >= h) | (x < 0) | (x >= w)
        gather = torch.where(outside, h * w, y * w + x).reshape(-1)
        i, j = torch.meshgrid(torch.arange(h) + pad, torch.arange(w) + pad, indexing="ij")
        unphase = ((i % 2) * 2 + j % 2) * back.out_len + (i // 2) * back.out_pitch + j // 2
        own = {f.name: getattr(inner, f.name) for f in fields(Grid)}
        return PhaseGrid(**own, src_h=h, src_w=w, gather=gather, back=back, unphase=unphase.reshape(-1))

    def input_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """The phase planes of ``x`` in the kernel's ``[N, 4C, in_rows, pitch]`` layout, zeros
        at the padding and in the unused rows and columns (exact zeros, whatever ``x`` holds)."""
        n, c = x.shape[:2]
        flat = x.reshape(n * c, self.src_h * self.src_w)
        planes = torch.cat([flat, flat.new_zeros(n * c, 1)], 1).index_select(1, self.gather)
        return planes.view(n, 4 * c, self.in_rows, self.pitch)

    def input_grad(self, buf: torch.Tensor) -> torch.Tensor:
        """The input gradient ``[N, C, src_h, src_w]`` from the raw output buffer
        ``[N, 4C, back.out_len]`` of the input-gradient kernel run on ``back``."""
        n, c4 = buf.shape[:2]
        flat = buf.reshape(n * (c4 // 4), 4 * self.back.out_len).index_select(1, self.unphase)
        return flat.view(n, c4 // 4, self.src_h, self.src_w)
