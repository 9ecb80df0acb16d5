"""What every Triton kernel module shares: the optional Triton import and the fp32 -> storage-dtype rounding that
keeps kernels bit-exact with their torch references. Where a kernel may run is `backend`'s business."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

if triton is not None:

    @triton.jit
    def round_for_store(value, ptr, BF16: tl.constexpr):
        """`value` (fp32) rounded to nearest even in the element type of `ptr`.

        Parameters:
            value: fp32 block.
            ptr: the pointer the result is stored through (its element type is the target).
            BF16: the target is bf16, rounded by integer arithmetic as torch does: Triton's interpreter
                truncates a plain fp32->bf16 cast, which would break bit-exact agreement with the CPU path.
        """
        if BF16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = value.to(ptr.dtype.element_ty)
        return out
