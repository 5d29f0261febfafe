"""Products written as ``torch.einsum`` with two operands: the subscripts parsed (ellipses
expanded, a free letter for the relevance axis K) and the absLRP product rule as a literal einsum.
Used by the product rules in :mod:`.attention`, :mod:`.transformer` and :mod:`.residual`."""
from __future__ import annotations

import string
from typing import Optional, Sequence

import torch
from torch import Tensor


def _parse_einsum(eq: str, operands: Sequence[Tensor]):
    """Subscripts of each operand and of the output, ellipses expanded; a free letter for K."""
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    ins = lhs.split(",")
    used = set(c for c in eq if c.isalpha())
    free = [c for c in string.ascii_letters if c not in used]
    ell_rank = max((t.dim() - len(s.replace("...", "")) for s, t in zip(ins, operands) if "..." in s), default=0)
    ell = "".join(free[:ell_rank])
    free = free[ell_rank:]

    def expand(sub: str, rank: Optional[int]) -> str:
        if "..." not in sub:
            return sub
        n = (rank - len(sub.replace("...", ""))) if rank is not None else ell_rank
        return sub.replace("...", ell[ell_rank - n:] if n else "")

    ins = [expand(s, t.dim()) for s, t in zip(ins, operands)]
    if "->" in eq:
        out = expand(rhs, None)
    else:
        letters = "".join(ins)
        out = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
    for s in ins:
        if len(set(s)) != len(s):
            raise NotImplementedError(f"einsum {eq!r}: a repeated index within one operand (a diagonal) "
                                      "is not supported")
    return ins, out, free[0]


def einsum_contributions(eq: str, a: Tensor, b: Tensor, s: Tensor, want_a=True, want_b=True):
    """The product rule for ``h = einsum(eq, a, b)``: ``z = a * b`` over every index combination,
    ``r_a = sum over the rest of (z + |z|) * S`` (a literal einsum with a and b as operands)."""
    (sa, sb), so, k = _parse_einsum(eq, (a, b))
    ra = rb = None
    if want_a:
        spec = f"{k}{so},{sa},{sb}->{k}{sa}"
        ra = torch.einsum(spec, s, a, b) + torch.einsum(spec, s, a.abs(), b.abs())
    if want_b:
        spec = f"{k}{so},{sa},{sb}->{k}{sb}"
        rb = torch.einsum(spec, s, a, b) + torch.einsum(spec, s, a.abs(), b.abs())
    return ra, rb
