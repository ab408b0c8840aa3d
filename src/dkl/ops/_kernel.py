"""Triton kernel for the row-wise KL / DKL / IKL divergences (forward statistics and gradients).

One program handles one row of ``C`` logits, read in blocks of ``BLOCK`` columns. Pass 1 keeps
running (online) statistics: log-sum-exps with a running maximum for the softmaxes, and the
weighted mean / centred second moment of ``e = target - input`` merged block by block (Chan's
parallel update), so the loss never subtracts two large sums; ``e`` and the sCE sum are also taken
relative to the row's first entry, so no accumulator carries the logits' common offset. Pass 2 reads the row again and writes
the gradient(s), already multiplied by a per-row scale. ``PASS1`` / ``PASS2`` choose which passes a
launch runs: the autograd forward runs pass 1 only, its backward pass 2 only (from the saved
per-row statistics), and the chunked LLM path runs both in one launch.

The one-launch form can also add a hard-label cross-entropy on the input's logits (``HAS_CE``,
the next-token loss of the LLM path): its log-sum-exp comes from pass 1 (the input's own softmax
when ``T = 1``, ``CE_AT_T``, else one more online log-sum-exp), and pass 2 adds
``ce_weight * (softmax(s) - onehot(y))`` to the input's gradient. The gradient may be written over
the input logits themselves (the LLM path passes the same buffer): pass 2 reads each block of the
row before it writes that block, and reads nothing of the row afterwards.

Non-finite logits follow the torch losses' rule: a ``-inf`` target logit marks a class the target
rules out (probability 0, wMSE weight 0, its ``e`` taken as 0 so no ``0 * inf`` appears); a ``-inf``
input logit on a class the target keeps makes the row's loss ``+inf`` (its ``e`` is taken as 0 too,
so the row's gradients stay finite, as on the torch path); a row whose target logits, or whose
input logits, are all ``-inf`` gives NaN, and so does one with a NaN or ``+inf`` logit. Running maxima that are still ``-inf`` are replaced by 0 where they
rescale a sum, so a block of ruled-out classes never produces ``-inf - -inf``.

This module imports triton at import time; ``dkl.ops`` imports it lazily. Whether the kernel runs
compiled or in the interpreter is decided by ``TRITON_INTERPRET`` when this module is imported.
"""

from __future__ import annotations

import triton
import triton.language as tl

KIND_KL = 0
KIND_DKL = 1
KIND_IKL = 2

# Where the wMSE weights come from.
WMODE_TARGET_SOFTMAX = 0  # softmax(target / T): the same softmax as the sCE / KL target
WMODE_WEIGHT_SOFTMAX = 1  # softmax(target / T2) with T2 != T (IKL only)
WMODE_CLASS_WEIGHTS = 2  # explicit non-negative (B, C) weights (IKL only)

# per-row statistics saved between the passes: lse_s, lse_t, lse_w (or W), mean(e - e_ref)
# (e_ref: the gap at a reference column, which pass 2 finds again)
N_STATS = 4


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x):
    """``exp(x)`` as ``exp2(x log2(e))``: one ``ex2.approx.ftz``, where ``tl.exp`` adds a range
    check and two rescaling multiplies per element to keep results below 2^-126 (their flush to
    0 changes no loss or gradient: such probabilities and weights add nothing). The argument
    keeps its form (``u - m``, which the compiler fuses into one multiply-add with the scaling of
    the logits), so nothing is lost at large logit offsets."""
    return tl.exp2(x * LOG2E)


@triton.jit
def _finite_or_zero(x):
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def _shift(m):
    """The shift used with a running maximum ``m``: ``m``, or 0 while ``m`` is still -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _references(s_row, t_row, n_cols, offs, BLOCK: tl.constexpr):
    """``(s_j, t_j)`` at the column ``j`` of the largest finite target entry in the row's first
    block (non-finite entries there give 0; ``(0, 0)`` when that block has no finite target)."""
    inb = offs < n_cols
    t = tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
    t = tl.where(inb & (tl.abs(t) < float("inf")), t, float("-inf"))
    top = tl.max(t, axis=0)
    at = tl.argmax(t, axis=0)
    s = tl.load(s_row + at, mask=n_cols > 0, other=0.0).to(tl.float32)
    found = top > float("-inf")
    return tl.where(found, _finite_or_zero(s), 0.0), tl.where(found, top, 0.0)


@triton.jit
def _raw_gap(t, s, e_ref, PAIRS: tl.constexpr):
    """``t - s - e_ref``: around the reference gap first (logits of different levels keep
    their digits), or, with ``PAIRS`` (class weights, which may weigh a class both sides mask at
    -1e9), subtracting first whichever of ``s`` and ``e_ref`` is nearer to ``t``."""
    around = t - e_ref
    if PAIRS:
        direct = t - s
        return tl.where(tl.abs(direct) <= tl.abs(around), direct - e_ref, around - s)
    return around - s


@triton.jit
def _divergence_kernel(
    s_ptr,  # (B, C) input logits (the side being trained), fp32 / bf16 / fp16
    t_ptr,  # (B, C) target logits, fp32 / bf16 / fp16
    cw_ptr,  # (B, C) class weights (WMODE 2), any float dtype; unused otherwise
    mask_ptr,  # (B,) uint8 valid-row mask (HAS_MASK); unused otherwise
    labels_ptr,  # (B,) int64 hard labels in [0, C) (HAS_CE); unused otherwise
    ce_ptr,  # (B,) fp32 per-row hard-label CE, unweighted (written by PASS1 when HAS_CE)
    scale_ptr,  # (B,) fp32 per-row gradient scale (PASS2, HAS_SCALE); unused otherwise
    loss_ptr,  # (B,) fp32 per-row loss (written by PASS1)
    stats_ptr,  # (B, N_STATS) fp32 per-row statistics (written by PASS1, read by PASS2 alone)
    gs_ptr,  # (B, C) gradient w.r.t. the input, input dtype (PASS2 and GRAD_S)
    gt_ptr,  # (B, C) gradient w.r.t. the target, target dtype (PASS2 and GRAD_T)
    C,  # number of columns
    s_stride,  # row strides (elements); columns are contiguous
    t_stride,
    cw_stride,
    gs_stride,
    gt_stride,
    scale_stride,
    inv_T,  # 1 / temperature
    inv_T2,  # 1 / weight_temperature
    alpha,  # weight of the soft cross-entropy (DKL / IKL)
    beta,  # weight of the wMSE (DKL / IKL)
    ce_weight,  # weight of the hard-label CE (HAS_CE)
    KIND: tl.constexpr,
    WMODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_CE: tl.constexpr,  # one launch (PASS1 and PASS2) only
    CE_AT_T: tl.constexpr,  # T = 1: the CE's softmax is the input's softmax at T
    PASS1: tl.constexpr,
    PASS2: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tl.static_assert(not HAS_CE or (PASS1 and PASS2), "the hard-label CE needs one launch")
    row = tl.program_id(0).to(tl.int64)  # int64: B * C can exceed 2**31
    offs = tl.arange(0, BLOCK)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    cw_row = cw_ptr + row * cw_stride

    if HAS_MASK:
        row_on = tl.load(mask_ptr + row) != 0
    else:
        row_on = tl.full([], 1, tl.int1)
    # Masked rows run no column loop in pass 1 and read nothing in pass 2 (masked loads).
    n_cols = tl.where(row_on, C, 0)

    # References: e is accumulated as e - e_ref and sum p_t u_s as sum p_t (u_s - ref_s), so no
    # running sum carries the logits' common offset (whose rounding would otherwise cancel
    # against the log-sum-exps at the end). They are the entries of the column where the first
    # block's target is largest (its largest weight): a masked class (a logit of -1e9) is never
    # one, and with no finite target there they are 0.
    s_top, t_top = _references(s_row, t_row, n_cols, offs, BLOCK)
    ref_s = s_top * inv_T
    ref_t = t_top * inv_T
    if KIND == 2:
        e_ref = t_top - s_top
    else:
        e_ref = ref_t - ref_s
    if HAS_CE:
        label = tl.where(row_on, tl.load(labels_ptr + row), 0)
        s_label = tl.load(s_row + label).to(tl.float32)
    lse_c = tl.zeros([], tl.float32)  # the CE's log-sum-exp (HAS_CE)

    if PASS1:
        neg_inf = float("-inf")
        m_s = tl.full([], neg_inf, tl.float32)  # running max of u_s = s / T
        z_s = tl.zeros([], tl.float32)  # sum exp(u_s - m_s)
        m_w = tl.full([], neg_inf, tl.float32)  # running max of the weight logits
        w_sum = tl.zeros([], tl.float32)  # sum of weights (scaled by exp(-m_w) in WMODE 0/1)
        mean = tl.zeros([], tl.float32)  # weighted mean of e
        m2 = tl.zeros([], tl.float32)  # weighted sum of (e - mean)^2 (same scale as w_sum)
        m_t = tl.full([], neg_inf, tl.float32)  # running max of u_t (WMODE 1/2 only)
        z_t = tl.zeros([], tl.float32)  # sum exp(u_t - m_t) (WMODE 1/2 only)
        b_acc = tl.zeros([], tl.float32)  # sum exp(u_t - m_t) * (u_s - ref_s)  (sCE)
        kl_t = tl.zeros([], tl.float32)  # KL: sum exp(u_t - m_w) * (u_t - m_w)
        kl_s = tl.zeros([], tl.float32)  # KL: sum exp(u_t - m_w) * (u_s - m_s)
        ruled_out = tl.zeros([], tl.float32)  # 1 once a kept class has a -inf input logit
        m_c = tl.full([], neg_inf, tl.float32)  # running max of s (HAS_CE, not CE_AT_T)
        z_c = tl.zeros([], tl.float32)  # sum exp(s - m_c)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inb = cols < C
            s = tl.load(s_row + cols, mask=inb, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=inb, other=0.0).to(tl.float32)
            kept = inb & (t != neg_inf)  # the classes the target does not rule out
            hit = tl.where(kept & (s == neg_inf), 1.0, 0.0)
            ruled_out = tl.maximum(ruled_out, tl.max(hit, axis=0))
            us = s * inv_T
            ut = t * inv_T

            # student softmax at T, online
            us_m = tl.where(inb, us, neg_inf)
            m_s_new = tl.maximum(m_s, tl.max(us_m, axis=0))
            z_s = z_s * _exp(m_s - _shift(m_s_new)) + tl.sum(_exp(us_m - _shift(m_s_new)), axis=0)
            d_s = _shift(m_s_new) - _shift(m_s)  # how far the student's reference moved
            m_s = m_s_new
            if HAS_CE and not CE_AT_T:
                s_m = tl.where(inb, s, neg_inf)
                m_c_new = tl.maximum(m_c, tl.max(s_m, axis=0))
                z_c = z_c * _exp(m_c - _shift(m_c_new)) + tl.sum(
                    _exp(s_m - _shift(m_c_new)), axis=0
                )
                m_c = m_c_new

            # weights of this block and the factor that rescales the running sums
            if WMODE == 2:
                wb = tl.load(cw_row + cols, mask=inb, other=0.0).to(tl.float32)
                wb = tl.where(kept, wb, 0.0)
                r_w = 1.0
            else:
                if WMODE == 0:
                    uw = tl.where(kept, ut, neg_inf)
                else:
                    uw = tl.where(kept, t * inv_T2, neg_inf)
                m_w_new = tl.maximum(m_w, tl.max(uw, axis=0))
                r_w = _exp(m_w - _shift(m_w_new))
                d_w = _shift(m_w_new) - _shift(m_w)  # how far the weights' reference moved
                wb = _exp(uw - _shift(m_w_new))
                m_w = m_w_new

            if KIND == 0:
                # KL as sum p (u_t - m_t) - sum p (u_s - m_s) around the running maxima, re-based
                # when they move: these terms are small where p is large, so huge logits lose
                # nothing to cancellation against the log-sum-exps (as around the first entries)
                gap_t = tl.where(kept, ut - _shift(m_w), 0.0)
                gap_s = tl.where(kept & (s != neg_inf), us - _shift(m_s), 0.0)
                kl_t = r_w * (kl_t - d_w * w_sum) + tl.sum(wb * gap_t, axis=0)
                kl_s = r_w * (kl_s - d_s * w_sum) + tl.sum(wb * gap_s, axis=0)
                w_sum = w_sum * r_w + tl.sum(wb, axis=0)
            else:
                if KIND == 2:
                    e = _raw_gap(t, s, e_ref, WMODE == 2)  # IKL: wMSE on raw logits
                else:
                    e = (ut - e_ref) - us
                e = tl.where(kept, e, 0.0)
                # a -inf input logit on a kept class: the row's loss is +inf (``ruled_out``);
                # its e (before the shift by e_ref) is taken as 0, as on the torch path, so the
                # statistics and the other classes' gradients stay finite
                e = tl.where(s == neg_inf, -e_ref, e)
                # block moments (centred in registers), then Chan's merge with the running ones
                wb_sum = tl.sum(wb, axis=0)
                mean_b = tl.sum(wb * e, axis=0) / tl.maximum(wb_sum, 1e-30)
                d = e - mean_b
                m2_b = tl.sum(wb * d * d, axis=0)
                wa = w_sum * r_w
                n = wa + wb_sum
                frac = tl.where(n > 0, wb_sum / tl.maximum(n, 1e-30), 0.0)
                delta = mean_b - mean
                mean = mean + delta * frac
                m2 = m2 * r_w + m2_b + delta * delta * wa * frac
                w_sum = n

            if KIND != 0:
                # 0 where the input rules a kept class out: the row is +inf by the rule below,
                # and 0 * -inf (a weight that underflowed) would make it NaN instead
                dus = tl.where(kept & (s != neg_inf), us - ref_s, 0.0)
                if WMODE == 0:
                    b_acc = b_acc * r_w + tl.sum(wb * dus, axis=0)
                else:
                    ut_m = tl.where(kept, ut, neg_inf)
                    m_t_new = tl.maximum(m_t, tl.max(ut_m, axis=0))
                    r_t = _exp(m_t - _shift(m_t_new))
                    pt_b = _exp(ut_m - _shift(m_t_new))
                    z_t = z_t * r_t + tl.sum(pt_b, axis=0)
                    b_acc = b_acc * r_t + tl.sum(pt_b * dus, axis=0)
                    m_t = m_t_new

        # masked rows ran no iteration: give them finite placeholders (their outputs are zeroed)
        m_s = tl.where(row_on, m_s, 0.0)
        z_s = tl.where(row_on, z_s, 1.0)
        m_w = tl.where(row_on, m_w, 0.0)
        w_sum = tl.where(row_on, w_sum, 1.0)
        m_t = tl.where(row_on, m_t, 0.0)
        z_t = tl.where(row_on, z_t, 1.0)
        lse_s = m_s + tl.log(z_s)
        if WMODE == 0:
            lse_t = m_w + tl.log(w_sum)
            z_t = w_sum
        else:
            lse_t = m_t + tl.log(z_t)
        if WMODE == 2:
            wstat = w_sum
            wmse = 0.5 * w_sum * m2
        else:
            wstat = m_w + tl.log(w_sum)
            wmse = 0.5 * m2 / w_sum
        if WMODE == 0:
            m_t = m_w
        if KIND == 0:
            # KL = sum p u_t - lse_t - (sum p u_s - lse_s), each around its maximum; the
            # p-weighted mean of e = u_t - u_s - e_ref (for the target's gradient) follows
            gaps = kl_t / w_sum - kl_s / w_sum
            loss = gaps - tl.log(z_t) + tl.log(z_s)
            mean = gaps + ((m_t - ref_t) - (m_s - ref_s))
        else:
            sce = (m_s - ref_s) + tl.log(z_s) - b_acc / z_t
            loss = beta * wmse + alpha * sce
        # +inf where the input rules out a kept class, unless the row is NaN anyway (a NaN or
        # +inf logit elsewhere): NaN wins, as on the torch path
        not_nan = loss == loss  # noqa: PLR0124  (the NaN test: core Triton has no isnan)
        loss = tl.where((ruled_out > 0) & not_nan, float("inf"), loss)
        loss = tl.where(z_t == 0, float("nan"), loss)  # every target logit -inf: no distribution
        loss = tl.where(z_s == 0, float("nan"), loss)  # every input logit -inf: none either
        if HAS_CE:
            if CE_AT_T:
                lse_c = lse_s
            else:
                lse_c = tl.where(row_on, m_c, 0.0) + tl.log(tl.where(row_on, z_c, 1.0))
            ce = tl.where(row_on, lse_c - s_label, 0.0)
            tl.store(ce_ptr + row, ce)
            loss = loss + ce_weight * ce
        loss = tl.where(row_on, loss, 0.0)
        tl.store(loss_ptr + row, loss)
        if PASS2 == 0:
            st = stats_ptr + row * 4
            tl.store(st + 0, lse_s)
            tl.store(st + 1, lse_t)
            tl.store(st + 2, wstat)
            tl.store(st + 3, mean)
    else:
        st = stats_ptr + row * 4
        lse_s = tl.load(st + 0)
        lse_t = tl.load(st + 1)
        wstat = tl.load(st + 2)
        mean = tl.load(st + 3)

    if PASS2:
        if HAS_SCALE:
            g = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        else:
            g = 1.0
        if WMODE == 2:
            wtot = wstat
        else:
            wtot = 1.0
        gs_row = gs_ptr + row * gs_stride
        gt_row = gt_ptr + row * gt_stride
        for start in range(0, C, BLOCK):
            cols = start + offs
            inb = cols < C
            ld = inb & row_on
            s = tl.load(s_row + cols, mask=ld, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=ld, other=0.0).to(tl.float32)
            kept = t != float("-inf")
            us = s * inv_T
            ut = t * inv_T
            ps = _exp(us - lse_s)
            pt = _exp(ut - lse_t)  # 0 on ruled-out classes
            if KIND == 2:
                e = _raw_gap(t, s, e_ref, WMODE == 2)
            else:
                e = (ut - e_ref) - us
            e = tl.where(kept, e, 0.0)
            e = tl.where(s == float("-inf"), -e_ref, e)  # as in pass 1
            if KIND == 0:
                gsv = inv_T * (ps - pt)
                gtv = inv_T * pt * (e - mean)
            elif KIND == 1:
                gsv = (alpha * inv_T) * (ps - pt)
                gtv = (beta * inv_T) * pt * (e - mean)
            else:
                if WMODE == 0:
                    w = pt
                elif WMODE == 1:
                    w = _exp(t * inv_T2 - wstat)
                else:
                    w = tl.load(cw_row + cols, mask=ld, other=0.0).to(tl.float32)
                    w = tl.where(kept, w, 0.0)
                dw = (beta * wtot) * w * (e - mean)
                gsv = (alpha * inv_T) * (ps - pt) - dw
                gtv = dw
            if HAS_CE:
                if CE_AT_T:
                    pc = ps
                else:
                    pc = _exp(s - lse_c)
                gsv = gsv + ce_weight * (pc - tl.where(cols == label, 1.0, 0.0))
            if GRAD_S:
                gsv = tl.where(row_on, g * gsv, 0.0)
                tl.store(gs_row + cols, gsv.to(gs_ptr.dtype.element_ty), mask=inb)
            if GRAD_T:
                gtv = tl.where(row_on, g * gtv, 0.0)
                tl.store(gt_row + cols, gtv.to(gt_ptr.dtype.element_ty), mask=inb)
