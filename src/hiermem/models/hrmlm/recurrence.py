"""The HRMLM recurrence over a sequence, with a hand-written backward pass.

Per token t (x_part[t] = the embedding part of the low cell's input product, precomputed for all
tokens) and per high-level cycle::

    a   = norm_a_low(x_part[t] + nxt_low)            nxt = h_h @ w_next.T  (one fused product)
    T x: h_l = update(a, norm_b_low(h_l @ W_hh_low.T), h_l)
    h_h = update(norm_a_high(h_l @ W_ih_high.T), norm_b_high(nxt_high), h_h)
    nxt = h_h @ w_next.T                              (w_next = [W_hh_high; W_ih_low[:, E:]])

With more than one thread the per-step products run as two column halves, one per core
(:class:`Product`). Autograd would record ~10 small ops per cell step and accumulate every weight
gradient step by step. The backward here walks the steps in reverse computing only the gradients of the
pre-activations and states, keeps them, and forms each weight gradient with one large matmul at
the end (and each norm's gain/bias gradient with one reduction). Values and gradients equal the
plain per-token loop (tested in float64 against a naive implementation).
"""

from __future__ import annotations

import torch

EPS = 1e-5


class Norm:
    """The per-gate normalisation of one pre-activation kind (a cell's input or recurrent gates):
    layer norm per gate with gain/bias (3H,), or a bias (3H,). Records what its backward needs."""

    def __init__(self, hidden: int, params: tuple[torch.Tensor, ...], save: bool):
        self.H, self.ln = hidden, len(params) == 2
        self.gain = params[0].view(3, hidden) if self.ln else None
        self.bias = params[-1].view(3, hidden) if self.ln else params[0]
        self.saved: list | None = [] if save else None
        self.grads: list[torch.Tensor] = []  # d output of each call (reverse order)
        self.xhats: list[torch.Tensor] = []  # normalised inputs (reverse order), for the gain grad

    def __call__(self, pre: torch.Tensor) -> torch.Tensor:
        """pre (B, 3H) -> gates (B, 3H)."""
        if not self.ln:
            return pre + self.bias
        B = pre.shape[0]
        xhat, _, rstd = torch.native_layer_norm(pre.view(B, 3, self.H), (self.H,), None, None, EPS)
        if self.saved is not None:
            self.saved.append((xhat, rstd))
        return torch.addcmul(self.bias, xhat, self.gain).view(B, 3 * self.H)

    def recompute(self) -> torch.Tensor | None:
        """The output of the latest call not yet differentiated (LN only; None without LN)."""
        if not self.ln:
            return None
        xhat, _ = self.saved[-1]
        return torch.addcmul(self.bias, xhat, self.gain).view(xhat.shape[0], 3 * self.H)

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        """d pre-activation (B, 3H) of the latest call not yet differentiated, from d output."""
        self.grads.append(dy)
        if not self.ln:
            return dy
        xhat, rstd = self.saved.pop()
        self.xhats.append(xhat)
        B, H = dy.shape[0], self.H
        g = dy.view(B, 3, H) * self.gain
        # layer-norm backward with the normalised input: rstd * (g - mean(g) - xhat * mean(g * xhat)),
        # the means as sums scaled inside sub / addcmul (fewer small ops)
        dx = torch.addcmul(torch.sub(g, g.sum(-1, keepdim=True), alpha=1 / H), xhat,
                           (g * xhat).sum(-1, keepdim=True), value=-1 / H)
        return dx.mul_(rstd).view(B, 3 * H)

    def param_grads(self) -> tuple[torch.Tensor, ...]:
        dys = torch.stack(self.grads)  # (calls, B, 3H)
        dbias = dys.sum((0, 1))
        if not self.ln:
            return (dbias,)
        dgain = (dys.view(*dys.shape[:2], 3, self.H) * torch.stack(self.xhats)).sum((0, 1)).flatten()
        return dgain, dbias


SPLIT: bool | None = None  # two-core products: None = when more than one thread and enough steps


class Product:
    """``x @ m`` for the small per-step products (x (B, K), m (K, N) any view of a weight).

    A (4 x 512) by (512 x 1536) product is bound by reading the weight, and the BLAS runs it on
    one thread whatever the thread count. Split in two column halves and run as a batch-2 ``bmm``
    (which the intra-op pool spreads over two threads), each core reads half the weight: about
    1.7x faster on two cores. Each output element is the same dot product (its rounding may differ
    in the last bit with the BLAS kernel). The halves are a copy of the weight, made once per
    sequence (or kept between calls by the model when no gradient is needed); odd widths keep the
    plain product."""

    def __init__(self, m: torch.Tensor, split: bool):
        K, N = m.shape
        self.m = m
        self.halves = m.reshape(K, 2, N // 2).permute(1, 0, 2).contiguous() if split and N % 2 == 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.halves is None:
            return x @ self.m
        return torch.bmm(x.expand(2, *x.shape), self.halves).transpose(0, 1).reshape(x.shape[0], -1)


def use_split(steps: int) -> bool:
    """Whether a recurrence of ``steps`` sequential products per weight uses :class:`Product`'s
    two-core split (more than one thread and at least 16 steps, unless ``SPLIT`` says otherwise)."""
    return SPLIT if SPLIT is not None else torch.get_num_threads() > 1 and steps >= 16


def gru_update(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor):
    """GRU update: gates a, b (B, 3H), state h (B, H) -> (new state, rz (B, 2H), n (B, H))."""
    H = h.shape[-1]
    rz = torch.sigmoid(a[:, :2 * H] + b[:, :2 * H])
    n = torch.tanh(torch.addcmul(a[:, 2 * H:], rz[:, :H], b[:, 2 * H:]))
    return torch.lerp(n, h, rz[:, H:]), rz, n


def _update_backward(dh: torch.Tensor, b: torch.Tensor, h: torch.Tensor, rz: torch.Tensor, n: torch.Tensor):
    """Gradients (da, db, dh_prev) of :func:`gru_update` from d new state dh (B, H)."""
    H = h.shape[-1]
    r, z = rz[:, :H], rz[:, H:]
    da = torch.empty_like(b)  # written in place, gate by gate (no concatenations)
    dh_prev = dh * z
    dhz = dh - dh_prev  # dh (1 - z)
    dpre_n = torch.addcmul(dhz, dhz * n, n, value=-1, out=da[:, 2 * H:])  # dh (1 - z) (1 - n^2)
    torch.mul(dpre_n, b[:, 2 * H:], out=da[:, :H])
    torch.mul(dh, h - n, out=da[:, H:2 * H])
    da[:, :2 * H].mul_(torch.addcmul(rz, rz, rz, value=-1))  # sigmoid' = rz (1 - rz)
    db = da.clone()
    db[:, 2 * H:].mul_(r)
    return da, db, dh_prev


def run(x_part, low, high, w_next, w_hh_low, w_ih_high, norms, T: int, N: int, save: bool = False,
        products: tuple[Product, Product, Product] | None = None):
    """Forward over x_part (B, L, 3H_l) from states low (B, H_l), high (B, H_h).

    norms: parameters of (low input, low recurrent, high input, high recurrent) normalisations,
    each (gain, bias) with layer norm or (bias,) without. Returns (highs (B, L, H_h), lows
    (B, L, H_l), tape) where tape holds what :func:`run_backward` needs when ``save``.
    products: prepared :class:`Product` s of (w_next.T, w_hh_low.T, w_ih_high.T) (made here when None).
    """
    Hl, Hh = w_hh_low.shape[1], w_next.shape[1]
    na, nb, nah, nbh = (Norm(h, p, save) for h, p in zip((Hl, Hl, Hh, Hh), norms))
    split = 3 * Hh
    if products is None:
        two = use_split(x_part.shape[1] * N)
        products = tuple(Product(w.t(), two) for w in (w_next, w_hh_low, w_ih_high))
    p_next, p_low, p_high = products
    nxt = p_next(high)
    tape = {"low_prev": [], "rz": [], "n": [], "b": [], "high_prev": [], "low_in": [],
            "rz_h": [], "n_h": [], "b_h": [], "high": [high]} if save else None
    highs, lows = [], []
    for x_t in x_part.unbind(1):
        for _ in range(N):
            a = na(x_t + nxt[:, split:])
            for _ in range(T):
                b = nb(p_low(low))
                new, rz, n = gru_update(a, b, low)
                if save:
                    tape["low_prev"].append(low), tape["rz"].append(rz), tape["n"].append(n)
                    tape["b"].append(None if nb.ln else b)
                low = new
            b_h = nbh(nxt[:, :split])
            new, rz, n = gru_update(nah(p_high(low)), b_h, high)
            if save:
                tape["low_in"].append(low), tape["rz_h"].append(rz), tape["n_h"].append(n)
                tape["b_h"].append(None if nbh.ln else b_h), tape["high_prev"].append(high)
            high = new
            nxt = p_next(high)
            if save:
                tape["high"].append(high)
        highs.append(high)
        lows.append(low)
    if save:
        tape["norms"] = (na, nb, nah, nbh)
    return torch.stack(highs, 1), torch.stack(lows, 1), tape


def run_backward(tape, d_highs, d_lows, w_next, w_hh_low, w_ih_high, T: int, N: int):
    """Gradients of :func:`run`'s inputs from d highs (B, L, H_h) and d lows (B, L, H_l)."""
    na, nb, nah, nbh = tape["norms"]
    B, L, Hh = d_highs.shape
    d_low = d_lows.new_zeros(B, w_hh_low.shape[1])
    d_high = d_highs.new_zeros(B, Hh)
    d_nxt = d_highs.new_zeros(B, w_next.shape[0])
    p_next, p_low, p_high = (Product(w, use_split(L * N)) for w in (w_next, w_hh_low, w_ih_high))
    d_x = []
    pre_b, pre_bh_in, d_nxt_all = [], [], []  # (d pre-activation) lists for the weight grads
    for t in range(L - 1, -1, -1):
        d_high = d_high + d_highs[:, t]
        d_low = d_low + d_lows[:, t]
        d_x_t = None
        for _ in range(N):
            high_out = tape["high"].pop()  # the state after this cycle, input of nxt
            d_nxt_all.append((d_nxt, high_out))
            d_high = d_high + p_next(d_nxt)
            b_h = tape["b_h"].pop()
            b_h = nbh.recompute() if b_h is None else b_h
            da_h, db_h, d_high = _update_backward(d_high, b_h, tape["high_prev"].pop(), tape["rz_h"].pop(),
                                                  tape["n_h"].pop())
            d_pre_h = nah.backward(da_h)
            pre_bh_in.append((d_pre_h, tape["low_in"].pop()))
            d_low = d_low + p_high(d_pre_h)
            d_nxt_high = nbh.backward(db_h)
            da_sum = None
            for _ in range(T):
                b = tape["b"].pop()
                b = nb.recompute() if b is None else b
                low_prev = tape["low_prev"].pop()
                da, db, d_low = _update_backward(d_low, b, low_prev, tape["rz"].pop(), tape["n"].pop())
                da_sum = da if da_sum is None else da_sum + da
                d_pre_b = nb.backward(db)
                pre_b.append((d_pre_b, low_prev))
                d_low = d_low + p_low(d_pre_b)
            d_pre_a = na.backward(da_sum)
            d_x_t = d_pre_a if d_x_t is None else d_x_t + d_pre_a
            d_nxt = torch.cat([d_nxt_high, d_pre_a], 1)
        d_x.append(d_x_t)
    high0 = tape["high"].pop()
    d_nxt_all.append((d_nxt, high0))
    d_high = d_high + d_nxt @ w_next

    def outer(pairs):  # sum over steps of d_pre.T @ input, as one matmul
        return torch.cat([p for p, _ in pairs]).t() @ torch.cat([v for _, v in pairs])

    d_norms = tuple(n.param_grads() for n in (na, nb, nah, nbh))
    return (torch.stack(d_x[::-1], 1), d_low, d_high, outer(d_nxt_all), outer(pre_b), outer(pre_bh_in), d_norms)


class Recurrence(torch.autograd.Function):
    """Autograd entry: ``Recurrence.apply(T, N, n_norm_params_per_norm, x_part, low, high, w_next,
    w_hh_low, w_ih_high, *norm_params)`` -> (highs, lows)."""

    @staticmethod
    def forward(ctx, T, N, k, x_part, low, high, w_next, w_hh_low, w_ih_high, *norm_params):
        norms = tuple(norm_params[i * k:(i + 1) * k] for i in range(4))
        highs, lows, tape = run(x_part, low, high, w_next, w_hh_low, w_ih_high, norms, T, N, save=True)
        ctx.tape, ctx.T, ctx.N = tape, T, N
        ctx.save_for_backward(w_next, w_hh_low, w_ih_high)
        return highs, lows

    @staticmethod
    def backward(ctx, d_highs, d_lows):
        w_next, w_hh_low, w_ih_high = ctx.saved_tensors
        B, L, _ = d_highs.shape if d_highs is not None else d_lows.shape
        if d_highs is None:
            d_highs = w_next.new_zeros(B, L, w_next.shape[1])
        if d_lows is None:
            d_lows = w_hh_low.new_zeros(B, L, w_hh_low.shape[1])
        dx, dlow, dhigh, dw_next, dw_hh, dw_ih, d_norms = run_backward(
            ctx.tape, d_highs, d_lows, w_next, w_hh_low, w_ih_high, ctx.T, ctx.N)
        ctx.tape = None
        return (None, None, None, dx, dlow, dhigh, dw_next, dw_hh, dw_ih, *[g for gs in d_norms for g in gs])
