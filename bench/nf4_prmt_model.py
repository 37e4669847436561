"""A Python model of CUDA __byte_perm (PRMT) that checks v3r's register NF4 decode
(csrc/nf4.cu v3_pairs_reg) against v3's table lookup for every 16-bit half-word: run it after
changing the decode. python bench/nf4_prmt_model.py -> "mismatches 0"."""
import random

import numpy as np

def prmt(a, b, s):
    src = [(a >> (8*i)) & 0xFF for i in range(4)] + [(b >> (8*i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        f = (s >> (4*i)) & 0xF
        byte = src[f & 7]
        if f & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8*i)
    return out
code = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0]
h = [int(np.float16(c).view(np.uint16)) for c in code]
L = [sum((h[4*r+i] & 0xFF) << (8*i) for i in range(4)) for r in range(4)]
H = [sum((h[4*r+i] >> 8) << (8*i) for i in range(4)) for r in range(4)]
def sel(a, b, m):
    return ((a & ~m) | (b & m)) & 0xFFFFFFFF
def decode(w):
    t = (w << 4) & 0xFFFFFFFF
    out = []
    for half, msel in ((0, 0xD9C8), (1, 0xFBEA)):
        s = ((w >> (16*half)) & 0x7777)
        lo = sel(prmt(L[0], L[1], s), prmt(L[2], L[3], s), prmt(t, w, msel))
        hi = sel(prmt(H[0], H[1], s), prmt(H[2], H[3], s), prmt(t, w, msel))
        out.append(prmt(lo, hi, 0x4051))
        out.append(prmt(lo, hi, 0x6273))
    return out
def table(w):  # v3: pair j = half2(lo = code[byte_j >> 4], hi = code[byte_j & 15])
    res = []
    for j in range(4):
        b = (w >> (8*j)) & 0xFF
        res.append(h[b >> 4] | (h[b & 15] << 16))
    return res
bad = 0
for lowhalf in range(1 << 16):
    for w in (lowhalf | (random.getrandbits(16) << 16), (lowhalf << 16) | random.getrandbits(16)):
        if decode(w) != table(w):
            bad += 1
            if bad < 5: print(hex(w), [hex(x) for x in decode(w)], [hex(x) for x in table(w)])
print("mismatches", bad)
print("L", [hex(x) for x in L], "H", [hex(x) for x in H])
