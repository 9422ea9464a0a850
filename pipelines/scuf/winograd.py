"""3x3 convolutions of the SCUF VAE's CPU inference copy as Winograd F(2x2, 3x3), for bfloat16 on the CPU.

oneDNN's bfloat16 convolutions already run at this kind of CPU's peak (README "Speed and memory"), so a 3x3 conv
only gets faster with fewer multiply-adds. Winograd's F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input
tile as 16 products of transformed values: per tile and channel pair 16 multiply-adds instead of 36, summed over the
input channels as 16 independent matrix products ``[tiles, C] @ [C, K]`` (one batched bfloat16 ``bmm``). The input
transform ``B^T d B`` and the output transform ``A^T m A`` are sums and differences of tile values (float32 in two
compiled kernels, numba); the weight transform ``G g G^T`` is done once, when the copy is built.

It pays only where the transforms are cheap next to the products, i.e. for wide layers: on the 2-core Zen 4 of the
README, 512 channels at 64x64 and 128x128 take ~0.6-0.75x the CPU time of oneDNN's conv, 256 channels at 256x256
~0.8-0.9x, 128 channels at 512x512 ~1.2x (slower; the products are small matrices there). :func:`use_winograd`
therefore swaps only convs with at least :data:`MIN_CHANNELS` input and output channels (docs/scuf_speed.md).

Precision: the transformed inputs, transformed weights and the products are each rounded to bfloat16, so one conv's
error against float64 is ~3x that of oneDNN's bfloat16 conv (which rounds only its output): 0.35-0.46 % vs 0.14 %
mean relative error on random data; tests/test_scuf_winograd.py holds it to the bfloat16 goals of the pipeline.
Work is done block by block (a few rows of tiles: the transformed block stays in cache) on
``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

MIN_CHANNELS = 256  # narrower convs stay oneDNN's (Winograd was slower at 128 channels, see the module docstring)
BLOCK_BYTES = 16 << 20  # transformed input per block (16 x tiles x C bfloat16): about half the L3 of the test CPU

# F(2x2, 3x3) with interpolation points 0, 1, -1: B^T d B, G g G^T, A^T m A (Lavin & Gray 2016)
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))

_kernels = None
_kernels_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None
_workspace = threading.local()
# numba names cached files after the source file and function only; tag them with the import name (the pack is
# imported as comfyui_lowlight... when installed and under its folder's path by ComfyUI)
_CACHE_TAG = "_" + hashlib.sha1(__name__.encode()).hexdigest()[:12]


def available() -> bool:
    """Whether the compiled transforms can run (numba importable)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _compile():
    import numba

    def jit(function):
        function.__qualname__ += _CACHE_TAG
        options = dict(nogil=True, fastmath={"contract"}, error_model="numpy")
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # no writable cache location: compile in memory each session
            return numba.njit(**options)(function)

    half, bit, shift = np.uint32(0x7FFF), np.uint32(1), np.uint32(16)

    def input_transform(x, v, base, t0, t1):
        """Tile rows ``t0..t1`` of ``x`` ``[H, W, C]`` (bfloat16 bits, zero padding 1) -> ``v[16, t - base, TW, C]``
        (bfloat16 bits, rounded to nearest even): ``B^T d B`` of each 4x4 tile starting at (2 ti - 1, 2 tj - 1).

        Neighbouring tiles share two columns, so ``B^T`` (along the rows) is applied once per input column, into a
        ring of the last four columns, and ``B`` (along the columns) once per tile."""
        height, width, channels = x.shape
        tiles_w = v.shape[2]
        load_bits = np.zeros((4, channels), np.uint32)
        d = load_bits.view(np.float32)
        ring = np.zeros((4, 4, channels), np.float32)  # [column (col + 1) % 4, B^T row, channel]
        out = np.empty((16, channels), np.float32)
        out_bits = out.view(np.uint32)
        for ti in range(t0, t1):
            for col in range(-1, 2 * tiles_w + 1):
                for r in range(4):
                    row = 2 * ti - 1 + r
                    if row < 0 or row >= height or col < 0 or col >= width:
                        for c in range(channels):
                            load_bits[r, c] = 0
                    else:
                        for c in range(channels):
                            load_bits[r, c] = np.uint32(x[row, col, c]) << shift
                slot = (col + 1) & 3
                for c in range(channels):
                    ring[slot, 0, c] = d[0, c] - d[2, c]
                    ring[slot, 1, c] = d[1, c] + d[2, c]
                    ring[slot, 2, c] = d[2, c] - d[1, c]
                    ring[slot, 3, c] = d[1, c] - d[3, c]
                if col < 2 or col & 1:
                    continue
                tj = col // 2 - 1  # the tile whose last column this is: columns 2 tj - 1 .. 2 tj + 2
                s0, s1, s2, s3 = (col - 2) & 3, (col - 1) & 3, col & 3, (col + 1) & 3
                for i in range(4):
                    for c in range(channels):
                        a0 = ring[s0, i, c]
                        a1 = ring[s1, i, c]
                        a2 = ring[s2, i, c]
                        a3 = ring[s3, i, c]
                        out[4 * i, c] = a0 - a2
                        out[4 * i + 1, c] = a1 + a2
                        out[4 * i + 2, c] = a2 - a1
                        out[4 * i + 3, c] = a1 - a3
                for k in range(16):
                    for c in range(channels):
                        u = out_bits[k, c]
                        v[k, ti - base, tj, c] = np.uint16((u + half + ((u >> shift) & bit)) >> shift)

    def output_transform(m, bias, y, base, t0, t1):
        """Tile rows ``t0..t1``: ``m[16, t - base, TW, K]`` (bfloat16 bits) -> ``A^T m A + bias`` into the 2x2 output
        tiles of ``y`` ``[H, W, K]`` (bfloat16 bits; tiles past an odd edge are cut)."""
        height, width, channels = y.shape
        tiles_w = m.shape[2]
        m_bits = np.zeros((16, channels), np.uint32)
        mf = m_bits.view(np.float32)
        out = np.empty((4, channels), np.float32)
        out_bits = out.view(np.uint32)
        for ti in range(t0, t1):
            for tj in range(tiles_w):
                for p in range(16):
                    for c in range(channels):
                        m_bits[p, c] = np.uint32(m[p, ti - base, tj, c]) << shift
                for c in range(channels):
                    s00 = mf[0, c] + mf[1, c] + mf[2, c]
                    s01 = mf[1, c] - mf[2, c] - mf[3, c]
                    s10 = mf[4, c] + mf[5, c] + mf[6, c]
                    s11 = mf[5, c] - mf[6, c] - mf[7, c]
                    s20 = mf[8, c] + mf[9, c] + mf[10, c]
                    s21 = mf[9, c] - mf[10, c] - mf[11, c]
                    s30 = mf[12, c] + mf[13, c] + mf[14, c]
                    s31 = mf[13, c] - mf[14, c] - mf[15, c]
                    b = bias[c]
                    out[0, c] = s00 + s10 + s20 + b
                    out[1, c] = s01 + s11 + s21 + b
                    out[2, c] = s10 - s20 - s30 + b
                    out[3, c] = s11 - s21 - s31 + b
                for q in range(4):
                    row = 2 * ti + (q >> 1)
                    col = 2 * tj + (q & 1)
                    if row < height and col < width:
                        for c in range(channels):
                            u = out_bits[q, c]
                            y[row, col, c] = np.uint16((u + half + ((u >> shift) & bit)) >> shift)

    return jit(input_transform), jit(output_transform)


def _get_kernels():
    global _kernels
    with _kernels_lock:
        if _kernels is None:
            _kernels = _compile()
    return _kernels


def _parallel(kernel, start: int, stop: int, *args) -> None:
    """``kernel(*args, t0, t1)`` over tile rows ``start..stop``, split evenly over torch's thread count."""
    global _pool
    threads = max(1, min(torch.get_num_threads(), stop - start))
    if threads == 1:
        kernel(*args, start, stop)
        return
    if _pool is None or _pool[0] < threads:
        _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="scuf-winograd"))
    bounds = [start + (stop - start) * i // threads for i in range(threads + 1)]
    for future in [_pool[1].submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(threads)]:
        future.result()


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def _buffer(name: str, numel: int) -> torch.Tensor:
    """A per-thread bfloat16 scratch buffer of at least ``numel`` values, kept between calls (fresh memory of this
    size costs page faults on every call)."""
    buf = getattr(_workspace, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.bfloat16)
        setattr(_workspace, name, buf)
    return buf[:numel]


def transformed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``G g G^T`` of a ``[K, C, 3, 3]`` kernel as ``[16, C, K]`` in the weight's dtype (computed in float64)."""
    g = torch.tensor(_G, dtype=torch.float64)
    u = torch.einsum("ij,kcjl,ml->imck", g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


class WinogradConv2d(nn.Module):
    """A 3x3 conv (stride 1, padding 1, no groups or dilation) on bfloat16 CPU tensors as Winograd F(2x2, 3x3).

    Built from a ``nn.Conv2d``; keeps only the transformed weight (16/9 of the kernel) and the bias. Input of any
    layout (made channels_last), output channels_last.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"WinogradConv2d needs a 3x3 stride-1 padding-1 conv, got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = nn.Parameter(transformed_weight(conv.weight), requires_grad=False)
        bias = torch.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach().float()
        self.register_buffer("bias", bias.contiguous(), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), Winograd F(2x2, 3x3)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[1] != self.in_channels:
            raise ValueError(f"WinogradConv2d: expected a bfloat16 CPU tensor with {self.in_channels} channels, "
                             f"got {x.dtype} on {x.device} with shape {tuple(x.shape)}")
        input_transform, output_transform = _get_kernels()
        n, channels, height, width = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        k = self.out_channels
        tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
        rows = max(1, min(tiles_h, BLOCK_BYTES // (32 * channels * tiles_w)))
        v = _buffer("v", 16 * rows * tiles_w * channels).view(16, rows, tiles_w, channels)
        m = _buffer("m", 16 * rows * tiles_w * k).view(16, rows * tiles_w, k)
        v_bits, m_bits = _bits(v), _bits(m).reshape(16, rows, tiles_w, k)
        bias = self.bias.numpy()
        y = torch.empty((n, k, height, width), dtype=torch.bfloat16, memory_format=torch.channels_last)
        for i in range(n):
            x_bits, y_bits = _bits(x[i].permute(1, 2, 0)), _bits(y[i].permute(1, 2, 0))
            for start in range(0, tiles_h, rows):
                stop = min(tiles_h, start + rows)
                _parallel(input_transform, start, stop, x_bits, v_bits, start)
                count = (stop - start) * tiles_w
                torch.bmm(v.view(16, rows * tiles_w, channels)[:, :count], self.weight, out=m[:, :count])
                _parallel(output_transform, start, stop, m_bits, bias, y_bits, start)
        return y


def eligible(conv: nn.Module) -> bool:
    """A plain 3x3 conv, stride 1, padding 1 (zeros), no groups or dilation."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def pays(conv: nn.Module) -> bool:
    """Whether :class:`WinogradConv2d` replaces ``conv`` in a CPU bfloat16 model: eligible and wide enough."""
    return (eligible(conv) and conv.weight.dtype == torch.bfloat16 and conv.weight.device.type == "cpu"
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)


def use_winograd(model: nn.Module) -> int:
    """Replace every conv of ``model`` for which :func:`pays` holds by a :class:`WinogradConv2d` (in place); returns
    how many. Nothing changes without numba."""
    if not available():
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if pays(child)]
    for parent, name, child in swaps:
        setattr(parent, name, WinogradConv2d(child))
    return len(swaps)
