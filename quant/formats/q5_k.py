"""Q5_K: 256 values, 176 bytes: f16 d, f16 dmin, scales[12] (as Q4_K), qh[32], qs[128] (as Q4_K):
group j's fifth bits are bit j of qh[0..31]; w = d * sc_j * q - dmin * m_j."""
from ..types import Q5_K
from .base import BlockFormat, Group
from .q4_k import kscales, scales_mins_k4


def unpack(e):
    s, m = scales_mins_k4(e, 4, e.f16(0), e.f16(2))
    qh = e.load(16, 32)
    out = []
    for j in range(8):
        lo = e.vand(e.vshr(e.load(48 + 32 * (j // 2), 32), 4 * (j % 2)), 15)
        q = e.vor(lo, e.bitplane(qh, list(range(32)), [1 << j] * 32, 16))
        out.append(Group(q, [e.lane(s, j)], [e.lane(m, j)]))
    return out


FORMAT = BlockFormat(Q5_K, unpack, f16_at=(0, 2), has_min=True, centre=16, kscales=kscales)
