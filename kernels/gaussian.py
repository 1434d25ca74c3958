"""Fused Gaussian latent kernels: std transform, reparameterized sample and per-step KL.

One forward kernel and one backward kernel serve every public Gaussian op (``std_from_raw`` aside, which is a
plain elementwise pair at the end of the file). Constexpr flags select what a launch computes:

* ``STD_MODE`` ``-1``: the inputs are (mean, std); ``0``/``1``/``2``: the inputs are raw head outputs whose second
  half goes through softplus / softplus_clamp / sigmoid2 (the order of ``fastwm.reference.STD_MODES``).
* ``NOISE`` ``0``: no sample; ``1``: noise read from memory; ``2``: noise drawn in the kernel from a Philox seed
  (read from a one-element int64 tensor, so launches never sync with the host and replay under CUDA graphs).
* ``HAS_KL``: compute KL(q || p) summed over the last dimension.

Layout: every tensor is seen as ``[N, S]`` rows (leading dims flattened). Means and stds may be strided views with a
row stride (the two halves of a raw ``[N, 2S]`` head output), the last dimension is always unit-stride.

Seeded noise: element ``(row, col)`` takes Philox counter ``row * ceil(S / 4) + col // 4`` and lane ``col % 4`` of
the four normals that one Philox call yields through two Box-Muller pairs. The mapping does not depend on block
sizes, so forward and backward (and any device, and :func:`fastwm.reference.philox_normal`) agree on the noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

_TORCH_TO_COMPUTE = {torch.float64: tl.float64}


# --------------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _log1p(y):
    # Accurate log(1 + y) for y >= 0 without libdevice (Goldberg's trick): exact where 1 + y rounds to 1.
    u = 1.0 + y
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, y, tl.log(u) * (y / d))


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with beta 1 and threshold 20.
    return tl.where(x > 20.0, x, _log1p(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _std_from_raw(raw, MIN_STD: tl.constexpr, STD_MODE: tl.constexpr):
    if STD_MODE == 0:
        std = _softplus(raw) + MIN_STD
    elif STD_MODE == 1:
        sp = _softplus(raw)
        # zeros + MIN_STD keeps the floor in sp's dtype; tl.maximum(sp, MIN_STD) would round it to fp32 first.
        std = tl.maximum(sp, tl.zeros_like(sp) + MIN_STD)
    else:
        std = 2.0 * tl.sigmoid(raw * 0.5) + MIN_STD
    return std


@triton.jit
def _std_from_raw_grad(raw, MIN_STD: tl.constexpr, STD_MODE: tl.constexpr):
    # d std / d raw; softplus_clamp follows torch.clamp_min, whose gradient passes where input >= min.
    # Past softplus's threshold (20) torch returns raw itself, so the slope is exactly 1 there.
    if STD_MODE == 0:
        d = tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
    elif STD_MODE == 1:
        sp = _softplus(raw)
        d = tl.where(sp >= tl.zeros_like(sp) + MIN_STD, tl.where(raw > 20.0, 1.0, tl.sigmoid(raw)), 0.0)
    else:
        s = tl.sigmoid(raw * 0.5)
        d = s * (1.0 - s)
    return d


@triton.jit
def _philox_normal_tile(seed, rows, s0, S4, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # [BLOCK_R, BLOCK_S] standard normals for columns s0 .. s0 + BLOCK_S (s0 a multiple of 4). The uniforms are fp32
    # (triton's conversion); Box-Muller runs in COMPUTE, so float64 launches get float64-accurate normals.
    cols4 = s0 // 4 + tl.arange(0, BLOCK_S // 4)
    counter = rows[:, None] * S4 + cols4[None, :]  # int64: Philox takes the high word as its second counter
    i0, i1, i2, i3 = tl.randint4x(seed, counter)
    u0, u1 = uint_to_uniform_float(i0).to(COMPUTE), uint_to_uniform_float(i1).to(COMPUTE)
    u2, u3 = uint_to_uniform_float(i2).to(COMPUTE), uint_to_uniform_float(i3).to(COMPUTE)
    n0, n1 = pair_uniform_to_normal(u0, u1)
    n2, n3 = pair_uniform_to_normal(u2, u3)
    # join(join(n0, n2), join(n1, n3))[..., j, k] is lane 2 * j + k: flattening puts lanes 0..3 in column order.
    n = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(n, [BLOCK_R, BLOCK_S])


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _kl_term(mean, std, pm, ps):
    # KL(N(mean, std) || N(pm, ps)) per element.
    # in ratios (std / ps, d / ps): 1 / ps^2 would overflow for stds below ~1e-19 (fp32), the ratios do not
    r = std / ps
    u = (mean - pm) / ps
    return 0.5 * (r * r + u * u - 1.0) - tl.log(r)


@triton.jit
def _kl_term_grad(mean, std, pm, ps, g):
    # g x the gradients of _kl_term: (d mean, d std, d ps); d pm = -d mean. In ratios, as the forward; exactly 0
    # where g is 0, also where a tiny ps makes a term overflow.
    r = std / ps
    u = (mean - pm) / ps
    return (tl.where(g != 0.0, g * (u / ps), 0.0), tl.where(g != 0.0, g * (r / ps - 1.0 / std), 0.0),
            tl.where(g != 0.0, g * ((1.0 - r * r - u * u) / ps), 0.0))


@triton.jit
def _gaussian_fwd_kernel(
    qm_ptr,  # [N, S] posterior mean, row stride stride_q
    qs_ptr,  # [N, S] posterior std (raw when STD_MODE >= 0), row stride stride_q
    pm_ptr,  # [N, S] prior mean, row stride stride_p (unused without HAS_KL)
    ps_ptr,  # [N, S] prior std or raw, row stride stride_p
    noise_ptr,  # [N, S] contiguous, NOISE == 1
    seed_ptr,  # [1] int64, NOISE == 2
    z_ptr,  # [N, S] contiguous out, NOISE > 0
    kl_ptr,  # [N] contiguous out (fp32 or fp64), HAS_KL
    qm_out,  # [N, S] contiguous out, STD_MODE >= 0
    qs_out,  # [N, S] contiguous out, STD_MODE >= 0
    pm_out,  # [N, S] contiguous out, STD_MODE >= 0 and HAS_KL
    ps_out,  # [N, S] contiguous out, STD_MODE >= 0 and HAS_KL
    N,
    S,
    stride_q,
    stride_p,
    MIN_STD: tl.constexpr,  # a constexpr so that float64 launches see it unrounded
    STD_MODE: tl.constexpr,
    NOISE: tl.constexpr,
    HAS_KL: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < N
    S4 = (S + 3) // 4
    kl_acc = tl.zeros([BLOCK_R], dtype=COMPUTE)
    seed = 0
    if NOISE == 2:
        seed = tl.load(seed_ptr)
    for chunk in range(0, tl.cdiv(S, BLOCK_S)):
        s0 = chunk * BLOCK_S
        cols = s0 + tl.arange(0, BLOCK_S)
        mask = rmask[:, None] & (cols < S)[None, :]
        q_off = rows[:, None] * stride_q + cols[None, :]
        out_off = rows[:, None] * S + cols[None, :]
        qm = tl.load(qm_ptr + q_off, mask=mask, other=0.0).to(COMPUTE)
        qs = tl.load(qs_ptr + q_off, mask=mask, other=1.0).to(COMPUTE)
        if STD_MODE >= 0:
            qs = _std_from_raw(qs, MIN_STD, STD_MODE)
            tl.store(qm_out + out_off, qm.to(qm_out.dtype.element_ty), mask=mask)
            tl.store(qs_out + out_off, qs.to(qs_out.dtype.element_ty), mask=mask)
        if NOISE > 0:
            if NOISE == 1:
                eps = tl.load(noise_ptr + out_off, mask=mask, other=0.0).to(COMPUTE)
            else:
                eps = _philox_normal_tile(seed, rows, s0, S4, COMPUTE, BLOCK_R, BLOCK_S)
            z = qm + qs * eps
            tl.store(z_ptr + out_off, z.to(z_ptr.dtype.element_ty), mask=mask)
        if HAS_KL:
            p_off = rows[:, None] * stride_p + cols[None, :]
            pm = tl.load(pm_ptr + p_off, mask=mask, other=0.0).to(COMPUTE)
            ps = tl.load(ps_ptr + p_off, mask=mask, other=1.0).to(COMPUTE)
            if STD_MODE >= 0:
                ps = _std_from_raw(ps, MIN_STD, STD_MODE)
                tl.store(pm_out + out_off, pm.to(pm_out.dtype.element_ty), mask=mask)
                tl.store(ps_out + out_off, ps.to(ps_out.dtype.element_ty), mask=mask)
            kl_acc += tl.sum(tl.where(mask, _kl_term(qm, qs, pm, ps), 0.0), axis=1)
    if HAS_KL:
        tl.store(kl_ptr + rows, kl_acc.to(kl_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _gaussian_bwd_kernel(
    qm_ptr,  # [N, S] as in the forward
    qs_ptr,
    pm_ptr,
    ps_ptr,
    noise_ptr,  # [N, S] contiguous, NOISE == 1
    seed_ptr,  # [1] int64, NOISE == 2
    gz_ptr,  # [N, S] contiguous upstream grad of z, HAS_GZ
    gkl_ptr,  # [N] contiguous upstream grad of kl, HAS_GKL
    gqm_ptr,  # [N, S] contiguous upstream grads of the mean/std outputs (STD_MODE >= 0), HAS_G* flags
    gqs_ptr,
    gpm_ptr,
    gps_ptr,
    dqm_ptr,  # [N, S] out, row stride stride_dq (the halves of d raw when STD_MODE >= 0)
    dqs_ptr,
    dpm_ptr,  # [N, S] out, row stride stride_dp, HAS_KL
    dps_ptr,
    dnoise_ptr,  # [N, S] contiguous out, WRITE_DNOISE
    N,
    S,
    stride_q,
    stride_p,
    stride_dq,
    stride_dp,
    MIN_STD: tl.constexpr,  # a constexpr so that float64 launches see it unrounded
    STD_MODE: tl.constexpr,
    NOISE: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_GZ: tl.constexpr,
    HAS_GKL: tl.constexpr,
    HAS_GQM: tl.constexpr,
    HAS_GQS: tl.constexpr,
    HAS_GPM: tl.constexpr,
    HAS_GPS: tl.constexpr,
    WRITE_DQM: tl.constexpr,
    WRITE_DNOISE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < N
    S4 = (S + 3) // 4
    seed = 0
    if NOISE == 2:
        seed = tl.load(seed_ptr)
    gkl = tl.zeros([BLOCK_R], dtype=COMPUTE)
    if HAS_KL and HAS_GKL:
        gkl = tl.load(gkl_ptr + rows, mask=rmask, other=0.0).to(COMPUTE)
    for chunk in range(0, tl.cdiv(S, BLOCK_S)):
        s0 = chunk * BLOCK_S
        cols = s0 + tl.arange(0, BLOCK_S)
        mask = rmask[:, None] & (cols < S)[None, :]
        q_off = rows[:, None] * stride_q + cols[None, :]
        out_off = rows[:, None] * S + cols[None, :]
        dq_off = rows[:, None] * stride_dq + cols[None, :]
        qm = tl.load(qm_ptr + q_off, mask=mask, other=0.0).to(COMPUTE)
        q_raw = tl.load(qs_ptr + q_off, mask=mask, other=1.0).to(COMPUTE)
        qs = q_raw
        if STD_MODE >= 0:
            qs = _std_from_raw(q_raw, MIN_STD, STD_MODE)
        d_qm = tl.zeros([BLOCK_R, BLOCK_S], dtype=COMPUTE)
        d_qs = tl.zeros([BLOCK_R, BLOCK_S], dtype=COMPUTE)
        if NOISE > 0 and HAS_GZ:
            gz = tl.load(gz_ptr + out_off, mask=mask, other=0.0).to(COMPUTE)
            if NOISE == 1:
                eps = tl.load(noise_ptr + out_off, mask=mask, other=0.0).to(COMPUTE)
            else:
                eps = _philox_normal_tile(seed, rows, s0, S4, COMPUTE, BLOCK_R, BLOCK_S)
            d_qm += gz
            d_qs += gz * eps
            if WRITE_DNOISE:
                tl.store(dnoise_ptr + out_off, (gz * qs).to(dnoise_ptr.dtype.element_ty), mask=mask)
        elif WRITE_DNOISE:
            tl.store(dnoise_ptr + out_off, tl.zeros([BLOCK_R, BLOCK_S], dtype=COMPUTE).to(dnoise_ptr.dtype.element_ty),
                     mask=mask)
        if STD_MODE >= 0:
            if HAS_GQM:
                d_qm += tl.load(gqm_ptr + out_off, mask=mask, other=0.0).to(COMPUTE)
            if HAS_GQS:
                d_qs += tl.load(gqs_ptr + out_off, mask=mask, other=0.0).to(COMPUTE)
        if HAS_KL:
            p_off = rows[:, None] * stride_p + cols[None, :]
            dp_off = rows[:, None] * stride_dp + cols[None, :]
            pm = tl.load(pm_ptr + p_off, mask=mask, other=0.0).to(COMPUTE)
            p_raw = tl.load(ps_ptr + p_off, mask=mask, other=1.0).to(COMPUTE)
            ps = p_raw
            if STD_MODE >= 0:
                ps = _std_from_raw(p_raw, MIN_STD, STD_MODE)
            d_mean, d_q, d_ps = _kl_term_grad(qm, qs, pm, ps, gkl[:, None])
            d_qm += d_mean
            d_qs += d_q
            d_pm = -d_mean
            if STD_MODE >= 0:
                if HAS_GPM:
                    d_pm += tl.load(gpm_ptr + out_off, mask=mask, other=0.0).to(COMPUTE)
                if HAS_GPS:
                    d_ps += tl.load(gps_ptr + out_off, mask=mask, other=0.0).to(COMPUTE)
                d_ps = d_ps * _std_from_raw_grad(p_raw, MIN_STD, STD_MODE)
            tl.store(dpm_ptr + dp_off, d_pm.to(dpm_ptr.dtype.element_ty), mask=mask)
            tl.store(dps_ptr + dp_off, d_ps.to(dps_ptr.dtype.element_ty), mask=mask)
        if STD_MODE >= 0:
            d_qs = d_qs * _std_from_raw_grad(q_raw, MIN_STD, STD_MODE)
        if WRITE_DQM:
            tl.store(dqm_ptr + dq_off, d_qm.to(dqm_ptr.dtype.element_ty), mask=mask)
        tl.store(dqs_ptr + dq_off, d_qs.to(dqs_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _std_fwd_kernel(
    raw_ptr,  # [numel] contiguous
    std_ptr,  # [numel] contiguous out
    numel,
    MIN_STD: tl.constexpr,  # a constexpr so that float64 launches see it unrounded
    STD_MODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    raw = tl.load(raw_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    tl.store(std_ptr + offs, _std_from_raw(raw, MIN_STD, STD_MODE).to(std_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _std_bwd_kernel(
    grad_ptr,  # [numel] contiguous upstream grad of std
    raw_ptr,  # [numel] contiguous
    draw_ptr,  # [numel] contiguous out
    numel,
    MIN_STD: tl.constexpr,  # a constexpr so that float64 launches see it unrounded
    STD_MODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    raw = tl.load(raw_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    d = g * _std_from_raw_grad(raw, MIN_STD, STD_MODE)
    tl.store(draw_ptr + offs, d.to(draw_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def empty(shape: tuple[int, ...], *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every output the launchers and ops allocate comes from here (the tests swap it for a NaN fill, so that an
    element a kernel fails to write cannot pass unnoticed)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)


def _compute_dtype(dtype: torch.dtype):
    """float64 stays float64 (so float64 gradcheck holds); every other dtype computes in fp32."""
    return _TORCH_TO_COMPUTE.get(dtype, tl.float32)


def _row_blocks(n_rows: int, s: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_S, num_warps) for an [n_rows, s] launch: tiles of about 4,096 elements, BLOCK_S >= 4 for Philox."""
    block_s = max(4, min(triton.next_power_of_2(s), 1024))
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), 4096 // block_s))
    num_warps = 8 if block_r * block_s >= 4096 else 4
    return block_r, block_s, num_warps


def _row_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else (t.stride(-2) if t.dim() >= 2 else t.shape[-1])


def gaussian_fwd(
    q_mean: torch.Tensor,
    q_std: torch.Tensor,
    p_mean: torch.Tensor | None,
    p_std: torch.Tensor | None,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    *,
    std_mode: int,
    min_std: float,
    sample: bool,
    kl: bool,
) -> tuple[torch.Tensor, ...]:
    """Launch the fused forward on 2-D ``[N, S]`` views (unit last stride). Returns (z, kl, qm, qs, pm, ps) where
    the outputs that this configuration does not produce are empty tensors."""
    n, s = q_mean.shape
    dt = q_mean.dtype
    kl_dtype = torch.float64 if dt == torch.float64 else torch.float32
    raw = std_mode >= 0

    def out(wanted: bool, shape: tuple[int, ...], dtype: torch.dtype = dt) -> torch.Tensor:
        # Outputs not produced are distinct 1-D empty tensors (a custom op's outputs may not alias each other).
        return empty(shape if wanted else (0,), like=q_mean, dtype=dtype)

    z = out(sample, (n, s))
    kl_out = out(kl, (n,), kl_dtype)
    qm_out, qs_out = out(raw, (n, s)), out(raw, (n, s))
    pm_out, ps_out = out(raw and kl, (n, s)), out(raw and kl, (n, s))
    if n == 0 or s == 0:
        if kl:
            kl_out.zero_()
        return z, kl_out, qm_out, qs_out, pm_out, ps_out
    noise_mode = 0 if not sample else (1 if noise is not None else 2)
    block_r, block_s, num_warps = _row_blocks(n, s)
    grid = (triton.cdiv(n, block_r),)
    _gaussian_fwd_kernel[grid](
        q_mean, q_std,
        p_mean if kl else q_mean, p_std if kl else q_std,
        noise if noise_mode == 1 else q_mean,
        seed if noise_mode == 2 else q_mean,
        z if sample else q_mean, kl_out if kl else q_mean,
        qm_out if raw else q_mean, qs_out if raw else q_mean,
        pm_out if raw and kl else q_mean, ps_out if raw and kl else q_mean,
        n, s, _row_stride(q_mean), _row_stride(p_mean) if kl else 0,
        MIN_STD=float(min_std), STD_MODE=std_mode, NOISE=noise_mode, HAS_KL=kl, COMPUTE=_compute_dtype(dt),
        BLOCK_R=block_r, BLOCK_S=block_s, num_warps=num_warps,
    )
    return z, kl_out, qm_out, qs_out, pm_out, ps_out


def gaussian_bwd(
    q_mean: torch.Tensor,
    q_std: torch.Tensor,
    p_mean: torch.Tensor | None,
    p_std: torch.Tensor | None,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    grads: tuple[torch.Tensor | None, ...],
    d_q_mean: torch.Tensor | None,
    d_q_std: torch.Tensor,
    d_p_mean: torch.Tensor | None,
    d_p_std: torch.Tensor | None,
    d_noise: torch.Tensor | None,
    *,
    std_mode: int,
    min_std: float,
    sample: bool,
    kl: bool,
) -> None:
    """Launch the fused backward, writing into the given ``d_*`` views (``d_q_mean`` None: not written, the caller
    uses grad_z itself). ``grads`` = (g_z, g_kl, g_qm, g_qs, g_pm, g_ps), each contiguous or None (a zero grad)."""
    n, s = q_mean.shape
    if n == 0 or s == 0:
        return
    g_z, g_kl, g_qm, g_qs, g_pm, g_ps = grads
    noise_mode = 0 if not sample else (1 if noise is not None else 2)
    block_r, block_s, num_warps = _row_blocks(n, s)
    grid = (triton.cdiv(n, block_r),)
    d = q_mean  # placeholder pointer for arguments a configuration never reads or writes
    _gaussian_bwd_kernel[grid](
        q_mean, q_std,
        p_mean if kl else d, p_std if kl else d,
        noise if noise_mode == 1 else d, seed if noise_mode == 2 else d,
        g_z if g_z is not None else d, g_kl if g_kl is not None else d,
        g_qm if g_qm is not None else d, g_qs if g_qs is not None else d,
        g_pm if g_pm is not None else d, g_ps if g_ps is not None else d,
        d_q_mean if d_q_mean is not None else d, d_q_std,
        d_p_mean if kl else d, d_p_std if kl else d,
        d_noise if d_noise is not None else d,
        n, s, _row_stride(q_mean), _row_stride(p_mean) if kl else 0,
        _row_stride(d_q_std), _row_stride(d_p_std) if kl else 0,
        MIN_STD=float(min_std), STD_MODE=std_mode, NOISE=noise_mode, HAS_KL=kl,
        HAS_GZ=g_z is not None, HAS_GKL=g_kl is not None,
        HAS_GQM=g_qm is not None, HAS_GQS=g_qs is not None, HAS_GPM=g_pm is not None, HAS_GPS=g_ps is not None,
        WRITE_DQM=d_q_mean is not None, WRITE_DNOISE=d_noise is not None,
        COMPUTE=_compute_dtype(q_mean.dtype), BLOCK_R=block_r, BLOCK_S=block_s, num_warps=num_warps,
    )


_STD_BLOCK = 1024


def std_fwd(raw: torch.Tensor, *, std_mode: int, min_std: float) -> torch.Tensor:
    """softplus / softplus_clamp / sigmoid2 std of a contiguous tensor, any shape."""
    std = empty(tuple(raw.shape), like=raw)
    numel = raw.numel()
    if numel:
        _std_fwd_kernel[(triton.cdiv(numel, _STD_BLOCK),)](
            raw, std, numel, MIN_STD=float(min_std), STD_MODE=std_mode, COMPUTE=_compute_dtype(raw.dtype), BLOCK=_STD_BLOCK
        )
    return std


def std_bwd(grad: torch.Tensor, raw: torch.Tensor, *, std_mode: int, min_std: float) -> torch.Tensor:
    """Gradient of :func:`std_fwd` with respect to ``raw``; both inputs contiguous."""
    d_raw = empty(tuple(raw.shape), like=raw)
    numel = raw.numel()
    if numel:
        _std_bwd_kernel[(triton.cdiv(numel, _STD_BLOCK),)](
            grad, raw, d_raw, numel, MIN_STD=float(min_std), STD_MODE=std_mode, COMPUTE=_compute_dtype(raw.dtype),
            BLOCK=_STD_BLOCK,
        )
    return d_raw
