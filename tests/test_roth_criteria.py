"""roth_* criteria vs the reference formulas written out here with loops (R: criteria/*.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmlcore import registry

B, D, C = 12, 6, 4


@pytest.fixture(autouse=True)
def float64():
    """These comparisons run in float64; the default dtype is restored for the other test files."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def batch(normalize, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    if normalize:
        x = F.normalize(x, dim=1)
    return x, torch.arange(B) % C


def trip(labels, seed=1):
    g = torch.Generator().manual_seed(seed)
    a, p, n = [], [], []
    for i in range(B):
        pos = [j for j in range(B) if labels[j] == labels[i] and j != i]
        neg = [j for j in range(B) if labels[j] != labels[i]]
        a.append(i); p.append(pos[torch.randint(len(pos), (1,), generator=g)]); n.append(neg[torch.randint(len(neg), (1,), generator=g)])
    return torch.tensor(a), torch.tensor(p), torch.tensor(n)


def check(loss, ref, x, y, idx):
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    v1 = loss(x1, y, idx)
    v2 = ref(x2)
    assert torch.isfinite(v1)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-6, abs=1e-9)
    g1, = torch.autograd.grad(v1, x1)
    g2, = torch.autograd.grad(v2, x2)
    assert torch.allclose(g1, g2, atol=1e-7), (g1 - g2).abs().max()


def build(name, **params):
    return registry.build("loss", name, params, num_classes=C, embed_dim=D, optim_lr=1e-5, miner_name="roth_rho_distance", train_seed=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_triplet_family(normalize):
    x, y = batch(normalize)
    a, p, n = trip(y)
    t = [(int(a[i]), int(p[i]), int(n[i])) for i in range(B)]
    check(build("roth_triplet"), lambda z: torch.stack([F.relu(((z[i]-z[j])**2).sum() - ((z[i]-z[k])**2).sum() + 0.2) for i, j, k in t]).mean(), x, y, (a, p, n))
    pd = lambda u, v: torch.sqrt(((u - v + 1e-6) ** 2).sum())
    check(build("roth_contrastive"), lambda z: torch.stack([F.relu(pd(z[i], z[j])) for i, j, k in t]).mean() + torch.stack([F.relu(1 - pd(z[i], z[k])) for i, j, k in t]).mean(), x, y, (a, p, n))

    def margin_ref(z, beta=torch.tensor([0.9, 1.0, 1.1, 1.2])):
        tot, cnt = 0, 0
        for i, j, k in t:
            dp = torch.sqrt(((z[i]-z[j])**2).sum() + 1e-8); dn = torch.sqrt(((z[i]-z[k])**2).sum() + 1e-8)
            lp, ln = F.relu(dp - beta[y[i]] + 0.2), F.relu(beta[y[i]] - dn + 0.2)
            tot = tot + lp + ln; cnt += int(lp > 0 or ln > 0)
        return tot / max(cnt, 1)
    m = build("roth_margin")
    m.beta.data = torch.tensor([0.9, 1.0, 1.1, 1.2])
    check(m, margin_ref, x, y, (a, p, n))

    def snr_ref(z):
        h = []
        for i, j, k in t:
            va = torch.var(z[i]); h.append(F.relu(torch.var(z[i]-z[j])/va - torch.var(z[i]-z[k])/va + 0.2))
        h = torch.stack(h); reg = torch.stack([z[i].sum().abs() for i, _, _ in t]).mean()
        return h.sum() / max(int((h > 0).sum()), 1) + 0.005 * reg
    check(build("roth_snr"), snr_ref, x, y, (a, p, n))


def test_snr_regulariser_off_for_distance_named_miners():
    s = registry.build("loss", "roth_snr", {}, num_classes=C, embed_dim=D, miner_name="roth_distance")
    assert s.reg_lambda == 0.0


@pytest.mark.parametrize("normalize", [True, False])
def test_quadruplet(normalize):
    x, y = batch(normalize)
    a, p, n = trip(y)
    q = build("roth_quadruplet")
    q.set_epoch(3)
    # the fourth sample: replay the generator to know k, then check the formula
    g = torch.Generator(); g.set_state(q.generator.get_state())
    cand = (n.view(-1, 1) != n.view(1, -1)).double()
    k = torch.multinomial(cand, 1, generator=g).squeeze(1)
    for i in range(B):
        assert int(n[int(torch.nonzero(cand[i])[0])]) != int(n[i])
    ref = lambda z: torch.stack([F.relu((z[a[i]]-z[p[i]]).norm() - (z[a[i]]-z[n[i]]).norm() + 0.2) for i in range(B)]).mean() + torch.stack([F.relu((z[a[i]]-z[p[i]]).norm() - (z[n[i]]-z[k[i]]).norm() + 0.2) for i in range(B)]).mean()
    check(q, ref, x, y, (a, p, n))


def sets(y):
    a = torch.arange(B)
    g = torch.Generator().manual_seed(2)
    same = y.view(-1, 1) == y.view(1, -1)
    pos = same & ~torch.eye(B, dtype=torch.bool)
    p = torch.multinomial(pos.double(), 1, generator=g).squeeze(1)
    return a, p, pos, ~same


@pytest.mark.parametrize("normalize", [True, False])
def test_npair_angular_lifted(normalize):
    x, y = batch(normalize)
    a, p, pos, neg = sets(y)
    N = [[j for j in range(B) if neg[i, j]] for i in range(B)]
    P = [[j for j in range(B) if pos[i, j]] for i in range(B)]

    def npair_ref(z):
        terms = [torch.log(1 + sum(torch.exp(z[i] @ z[k] - z[i] @ z[p[i]]) for k in N[i])) for i in range(B)]
        return torch.stack(terms).mean() + 0.005 * torch.stack([z[i].norm() for i in range(B)]).mean()
    check(build("roth_npair"), npair_ref, x, y, (a, p, neg))

    def ang_ref(z):
        t2 = math.tan(math.radians(45)) ** 2
        zn = z / z.norm(dim=1, keepdim=True)
        ang = torch.stack([torch.log(1 + sum(torch.exp(4*t2*(zn[i]+zn[p[i]]) @ zn[k] - 2*(1+t2)*zn[i] @ zn[p[i]]) for k in N[i])) for i in range(B)]).mean()
        npr = torch.stack([torch.log(1 + sum(torch.exp(torch.clamp(z[i] @ z[k] - z[i] @ z[p[i]], -50, 50)) for k in N[i])) for i in range(B)]).mean()
        return npr + 2 * ang + 0.005 * torch.stack([z[i].norm() for i in range(B)]).mean()
    check(build("roth_angular"), ang_ref, x, y, (a, p, neg))

    def lifted_ref(z, bug):
        out = []
        for i in range(B):
            if bug:  # per embedding dim: the norm over the set
                dp = torch.stack([torch.sqrt(sum((z[i, d] - z[j, d] + 1e-6) ** 2 for j in P[i])) for d in range(D)])
                dn = torch.stack([torch.sqrt(sum((z[i, d] - z[j, d] + 1e-6) ** 2 for j in N[i])) for d in range(D)])
            else:
                dp = torch.stack([(z[i] - z[j] + 1e-6).norm() for j in P[i]])
                dn = torch.stack([(z[i] - z[j] + 1e-6).norm() for j in N[i]])
            out.append(F.relu(torch.logsumexp(dp, 0) + torch.logsumexp(1 - dn, 0)))
        return torch.stack(out).mean() + 0.005 * torch.stack([z[i].norm() for i in range(B)]).mean()
    check(build("roth_lifted"), lambda z: lifted_ref(z, True), x, y, (a, pos, neg))
    check(build("roth_lifted", reference_bug=False), lambda z: lifted_ref(z, False), x, y, (a, pos, neg))


@pytest.mark.parametrize("normalize", [True, False])
def test_batch_and_proxy_criteria(normalize):
    x, y = batch(normalize)
    x = x * (0.5 if not normalize else 1.0)

    def ms_ref(z):
        s = z @ z.T; out = []
        for i in range(B):
            sp = torch.stack([s[i, j] for j in range(B) if y[j] == y[i] and j != i]); sn = torch.stack([s[i, j] for j in range(B) if y[j] != y[i]])
            kn, kp = sn[sn + 0.1 > sp.min()], sp[sp - 0.1 < sn.max()]
            if len(kn) == 0 or len(kp) == 0:
                continue
            out.append(torch.log(1 + torch.exp(-2 * (kp - 0.5)).sum()) / 2 + torch.log(1 + torch.exp(40 * (kn - 0.5)).sum()) / 40)
        return torch.stack(out).mean()
    check(build("roth_multisimilarity"), ms_ref, x, y, None)

    pn = build("roth_proxynca")
    W = torch.randn(C, D, generator=torch.Generator().manual_seed(5))
    pn.proxies.data = W.clone()
    def pn_ref(z):
        zz = 3 * z / z.norm(dim=1, keepdim=True); ww = 3 * W / W.norm(dim=1, keepdim=True)
        return torch.stack([((zz[i]-ww[y[i]])**2).sum() + torch.logsumexp(torch.stack([-((zz[i]-ww[c])**2).sum() for c in range(C) if c != y[i]]), 0) for i in range(B)]).mean()
    check(pn, pn_ref, x, y, None)

    af = build("roth_arcface"); af.class_map.data = W.clone()
    def af_ref(z):
        wn = W / W.norm(dim=1, keepdim=True); out = []
        for i in range(B):
            cos = torch.clamp(z[i] @ wn.T, 1e-10, 1 - 1e-10)
            logits = torch.stack([torch.cos(torch.acos(cos[c]) + 0.5) if c == y[i] else cos[c] for c in range(C)]) * 16
            out.append(-torch.log_softmax(logits, 0)[y[i]])
        return torch.stack(out).mean()
    check(af, af_ref, x, y, None)

    sm = build("roth_softmax"); sm.class_map.data = W.clone()
    check(sm, lambda z: torch.stack([-torch.log_softmax(z[i] @ (W / W.norm(dim=1, keepdim=True)).T / 0.05, 0)[y[i]] for i in range(B)]).mean(), x, y, None)

    for original in (False, True):
        st = build("roth_softtriplet", original=original)
        Wc = torch.randn(D, C * 2, generator=torch.Generator().manual_seed(6)); st.intra_class_centroids.data = Wc.clone()
        def st_ref(z):
            wn = Wc / Wc.norm(dim=0 if original else 1, keepdim=True)
            out = []
            for i in range(B):
                s = torch.stack([torch.stack([z[i] @ wn[:, c * 2 + k] for k in range(2)]) for c in range(C)])  # (C, K)
                w = torch.softmax(0.1 * s, dim=1 if original else 0)
                pc = (w * s).sum(1) - 0.01 * F.one_hot(y[i], C)
                out.append(-torch.log_softmax(8 * pc, 0)[y[i]])
            reg = sum(torch.sqrt(2.00001 - 2 * wn[:, c*2] @ wn[:, c*2+1]) for c in range(C)) / (C * 2 * 1)
            return torch.stack(out).mean() + 0.2 * reg
        check(st, st_ref, x, y, None)


def test_histogram():
    x, y = batch(True)
    nb = 65; w = 2 / (nb - 1)
    def ref(z):
        s = z @ z.T
        hp, hn = torch.zeros(nb), torch.zeros(nb)
        np_, nn_ = 0, 0
        for i in range(B):
            for j in range(i + 1, B):
                h = torch.stack([F.relu(1 - (s[i, j] - (-1 + r * w)).abs() / w) for r in range(nb)])
                if y[i] == y[j]:
                    hp = hp + h; np_ += 1
                else:
                    hn = hn + h; nn_ += 1
        hp, hn = hp / np_, hn / nn_
        return (hn * torch.cumsum(hp, 0)).sum()
    check(build("roth_histogram"), ref, x, y, None)


def test_no_tuple_gives_zero_never_nan():
    x, y = batch(True)
    e = torch.empty(0, dtype=torch.long)
    for name in ("roth_triplet", "roth_contrastive", "roth_margin", "roth_snr", "roth_quadruplet"):
        xx = x.clone().requires_grad_(True)
        v = build(name)(xx, y, (e, e, e))
        v.backward()
        assert v.item() == 0.0 and torch.isfinite(xx.grad).all()
    v = build("roth_npair")(x, y, (e, e, torch.zeros(0, B, dtype=torch.bool)))
    assert v.item() == 0.0
    one_class = torch.zeros(B, dtype=torch.long)
    assert build("roth_histogram")(x, one_class, None).item() == 0.0
    assert build("roth_multisimilarity")(x, one_class, None).item() == 0.0
    # SNR with no active triplet: the hinge part is 0 (R: 0/0 = NaN)
    a = torch.arange(B)
    v = registry.build("loss", "roth_snr", {"margin": -100.0}, miner_name="roth_distance")(x, y, (a, a, (a + 1) % B))
    assert v.item() == 0.0


def test_learnable_init_and_optimizer_group():
    m = build("roth_margin", beta=0.6)
    assert torch.all(m.beta == 0.6) and m.optimizer_group() == {"lr": 5e-4, "weight_decay": 0.0}
    assert build("roth_proxynca").optimizer_group()["lr"] == pytest.approx(5e-4)
    assert build("roth_arcface").optimizer_group()["lr"] == 5e-4
    assert build("roth_softmax").optimizer_group()["lr"] == 1e-5
    assert build("roth_softtriplet").optimizer_group()["lr"] == pytest.approx(1e-5)
    sm = build("roth_softmax")
    assert sm.class_map.abs().max() <= 1 / math.sqrt(D)
