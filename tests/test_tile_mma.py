"""The tensor-core tile primitives of csrc/common/tile_mma.cuh (mma.sync, ldmatrix, cp.async, swizzle), one tile
at a time through torch.ops.kdkernels.tile_check: on the emulator in CI (whose models follow the PTX ISA's
fragment tables) and on a GPU when there is one (the real instructions)."""
import pytest
import torch

from kdkernels import _ops


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.needs_cuda), pytest.param("emu", marks=pytest.mark.emu)])
def check(request):
    """(device, tile_check op)."""
    if request.param == "cuda":
        if not hasattr(torch.ops.kdkernels, "tile_check"):
            pytest.skip("kdkernels was built without CUDA")
        yield "cuda", torch.ops.kdkernels.tile_check
        return
    _ops.load_emu()
    yield "cpu", torch.ops.kdkernels_emu.tile_check


def _tf32(x):
    """float32 -> TF32, round to nearest with ties away from zero (cvt.rna.tf32.f32), as float64."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    u = ((u + 0x1000) & 0xFFFFE000).to(torch.int64)
    u = torch.where(u >= 2 ** 31, u - 2 ** 32, u).to(torch.int32)
    return u.view(torch.float32).double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bt", [False, True], ids=["B_kn_trans_ldmatrix", "Bt_nk_plain_ldmatrix"])
@pytest.mark.parametrize("m_valid", [16, 13])
def test_mma16816_equals_matmul(check, dtype, bt, m_valid):
    dev, op = check
    g = torch.Generator().manual_seed(7)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 8, generator=g).to(dtype)
    c = torch.randn(16, 8, generator=g)
    a_used = a.double().clone()
    a_used[m_valid:] = 0  # cp.async zero-fills the rows past m_valid
    want = a_used @ b.double() + c.double()  # 16-bit products are exact in float32; the sums are float32
    d = op(a.to(dev), (b.t().contiguous() if bt else b).to(dev), c.to(dev), "mma", bt, m_valid)
    torch.testing.assert_close(d.cpu().double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("m_valid", [16, 5])
def test_mma1688_tf32_equals_matmul_of_rounded_operands(check, m_valid):
    dev, op = check
    g = torch.Generator().manual_seed(9)
    a, b, c = torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g), torch.randn(16, 8, generator=g)
    a_used = _tf32(a)
    a_used[m_valid:] = 0
    want = a_used @ _tf32(b) + c.double()
    d = op(a.to(dev), b.to(dev), c.to(dev), "mma_tf32", False, m_valid).cpu().double()
    torch.testing.assert_close(d, want, rtol=1e-6, atol=1e-5)
    full = a.double() @ b.double() + c.double()  # the operands were rounded: TF32 is not float32
    full[m_valid:] = c.double()[m_valid:]
    assert (d - full).abs().max() > 1e-5


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_fragments_follow_the_ptx_tables(check, n, trans):
    # Distinct 16-bit values; matrix i is the 8x8 block at rows (i & 1) * 8, columns (i >> 1) * 8. PTX ISA
    # (ldmatrix): lane 4g + t receives M_i[g][2t], M_i[g][2t + 1] (low half first), or with .trans
    # M_i[2t][g], M_i[2t + 1][g].
    dev, op = check
    bits = torch.arange(256, dtype=torch.int32) * 97 % 65536
    x = bits.to(torch.int16).reshape(16, 16)  # int16 holds the bit patterns (wrapping above 32767)
    src = x.view(torch.bfloat16)
    got = op(src.to(dev), src.to(dev), torch.zeros(16, 8, device=dev), f"ldmatrix_x{n}" + ("_trans" if trans else ""),
             False, 16).cpu().to(torch.int64) & 0xFFFFFFFF
    want = torch.zeros(32, 4, dtype=torch.int64)
    u = x.to(torch.int64) & 0xFFFF
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(n):
            m = u[(i & 1) * 8:(i & 1) * 8 + 8, (i >> 1) * 8:(i >> 1) * 8 + 8]
            lo, hi = (m[2 * t, g], m[2 * t + 1, g]) if trans else (m[g, 2 * t], m[g, 2 * t + 1])
            want[lane, i] = lo | (hi << 16)
    assert torch.equal(got, want), (got ^ want).nonzero()[:8]
