"""A model of bench/patches/nf4_v4_one_token_dots_in_loop.patch's indexing (CPU, no torch): every
(row, step) sum the loop stores is read by exactly one dot, as the right row and step, and each
dot step runs only after the windows holding its steps are complete. For 444 configurations of
K, rows per CTA, warps per step, blocksize and scales per unit. Run: python3 <this file>."""
import itertools


def swap(r):
    return r ^ ((r & 1) << 2)


def check(K, rows, split, bs_log2, kspu, tiles_cta=None):
    kSteps = 16 // split
    steps = K // 64
    windows = -(-steps // kSteps)
    tiles = -(-rows // 16)
    tmax = tiles
    pair_holes = ((tmax + split - 1) // split + 1) // 2
    steps_log2 = bs_log2 - 6
    units_part = (steps >> steps_log2) // kspu
    assert units_part * kspu << steps_log2 == steps
    hole = lambda b, tf, p: (b * split + tf) * pair_holes + p
    written = {}
    # the loop's stores: warp (wstep, tfirst), its tiles tfirst + split * t
    for b in range(steps):
        for tf in range(split):
            my = (tiles - tf + split - 1) // split
            rot = 4 * ((b >> steps_log2) // kspu)
            for t0 in range(0, my, 2):
                for g in range(8):
                    for half, base in ((0, 2 * g), (1, 16 + 2 * g)):
                        m = g + 8 * half
                        for slot in (0, 1):
                            lt = t0 + slot
                            if lt >= my: continue  # (zero stored there: never read)
                            T = tf + split * lt
                            key = (hole(b, tf, t0 // 2), (base + rot) % 32 + slot)
                            assert (base + rot) % 32 + slot < 32
                            assert key not in written, key
                            written[key] = (T, m, b)
    upd = max(1, kSteps // (kspu << steps_log2))
    wpd = max(1, (kspu << steps_log2) // kSteps)
    dot_steps = -(-units_part // upd)
    dot_slots = rows * upd
    assert dot_slots <= 1024, dot_slots
    read = set()
    def dots(d, j_done):  # j_done: windows complete (all < j_done)
        for x in range(dot_slots):
            r, uu = x // upd, x % upd
            u = d * upd + uu
            if u >= units_part: continue
            T, m = r >> 4, swap(r & 15)
            tf, local = T % split, T // split
            for k in range(kspu):
                for b in range((u * kspu + k) << steps_log2, (u * kspu + k + 1) << steps_log2):
                    assert b // kSteps < j_done, (d, b, j_done)
                    key = (hole(b, tf, local >> 1), (2 * m + (local & 1) + 4 * u) % 32)
                    assert written[key] == (T, m, b), (key, written[key], (T, m, b))
                    assert (r, b) not in read
                    read.add((r, b))
    done = 0
    for j in range(windows + 1):
        window = j < windows
        if j > 0 and (not window or j % wpd == 0):
            todo = min(1, dot_steps - done) if window else dot_steps - done
            for _ in range(todo):
                dots(done, j)  # windows < j are complete (j - 1 was waited for)
                done += 1
    assert done == dot_steps
    assert read == {(r, b) for r in range(rows) for b in range(steps)}, "not every sum read"
    return windows, dot_steps, upd, wpd


n = 0
for K, rows, split, bs_log2, kspu in itertools.product(
        (1024, 3072, 4096, 11008, 14336), (16, 32, 109, 112, 128, 200, 256), (1, 2), (6, 7, 8),
        (2, 4, 8)):
    if split == 1 and rows > 128: continue
    if (K // 64) % (kspu << (bs_log2 - 6)): continue  # the plan needs whole units
    if K // 64 > 256: continue  # (one-token kernels: x whole)
    check(K, rows, split, bs_log2, kspu)
    n += 1
print("configurations checked:", n)
