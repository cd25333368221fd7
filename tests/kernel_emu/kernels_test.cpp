// Kernels of src/backend/cuda run on the CPU through cuda_emu.h (scripts/kernel_emu.sh):
// - gemv_row (modes 0-2) against the unfused kernels that make its input (rms_norm, silu_mul)
//   and a host product in f64;
// - gemv_qkv_rope against rms_norm -> host product -> qkv_rope_store (q, and the key and value
//   cache entries, f16);
// - every kernel of kernels.cu and gemv_row.cuh runs at least once;
// - sample_rows (the device sampler) against its specification run sequentially, token for token;
// - attend, the greedy pick (argmax_part + argmax_rows) and lora_update against host references;
// - the readers with LoRA stacks (lora_stack_at in rms_norm, silu_mul, qkv_rope_store) against
//   the same readers fed the equal update through the tiled path's `z` buffer.
// Exits non-zero on any mismatch.
#include "../../src/backend/cuda/kernels.cu"
#include <cstdio>
#include <algorithm>
#include <cstddef>
#include <random>

// The kernels' by-value arguments as the Rust side lays them out (lora_stack::StackArg, whose
// unit test checks the same offsets).
static_assert(sizeof(LoraStack) == 40 && offsetof(LoraStack, bt) == 16 && offsetof(LoraStack, t_stride) == 24 && offsetof(LoraStack, count) == 36, "LoraStack layout");
static_assert(sizeof(SampleParams) == 32 && offsetof(SampleParams, u) == 16 && offsetof(SampleParams, on) == 24, "SampleParams layout");

static std::mt19937 rng(7);
static float rnd(float s = 1.0f) { return std::uniform_real_distribution<float>(-s, s)(rng); }
static std::vector<float> rv(size_t n, float s = 1.0f) { std::vector<float> v(n); for (auto& x : v) x = rnd(s); return v; }
static std::vector<__half> rh(size_t n, float s = 1.0f) { std::vector<__half> v(n); for (auto& x : v) x = __float2half(rnd(s)); return v; }
static int failures = 0;
static void check(bool ok, const char* what, double got, double want) {
    if (!ok) { failures++; if (failures < 20) printf("FAIL %s: %g vs %g\n", what, got, want); }
}
static double dot(const __half* w, const __half* x, int k) { double s = 0; for (int i = 0; i < k; i++) s += (double)__half2float(w[i]) * __half2float(x[i]); return s; }

static void test_gemv_row() {
    for (int mode = 0; mode < 3; mode++)
        for (int k : {64, 96, 200}) for (int grid : {1, 3, 64}) {
            int n = 45;
            auto W = rh((size_t)n * k, 0.2f);
            auto x = rv(k), nw = rv(k), gu = rv(2 * k, 2.0f);
            auto h = rh(k);
            float eps = 1e-6f;
            std::vector<__half> in(k);
            LoraStack none{};
            if (mode == 0) in = h;
            if (mode == 1) { auto xc = x; emu_launch(rms_norm, dim3{1}, dim3{256}, xc.data(), (const float*)nw.data(), (const int*)nullptr, in.data(), (float*)nullptr, k, eps, (const float*)nullptr, (const int*)nullptr, none); }
            if (mode == 2) emu_launch(silu_mul, dim3{1, (unsigned)(k + 255) / 256}, dim3{256}, (const float*)gu.data(), in.data(), (float*)nullptr, k, (const float*)nullptr, (const int*)nullptr, none);
            auto y0 = rv(n); auto y = y0;
            int acc = mode != 1;
            emu_launch(gemv_row, dim3{(unsigned)grid}, dim3{256}, (const __half*)W.data(), n, k, mode, (const __half*)h.data(), (const float*)x.data(), (const float*)nw.data(), eps, (const float*)gu.data(), y.data(), acc);
            for (int o = 0; o < n; o++) {
                double want = dot(&W[(size_t)o * k], in.data(), k) + (acc ? y0[o] : 0.0);
                check(std::fabs(y[o] - want) < 1e-4 * (1 + std::fabs(want)), "gemv_row", y[o], want);
            }
        }
    printf("gemv_row: modes 0-2, k 64/96/200, grids 1/3/64: done\n");
}

static void test_gemv_qkv_rope() {
    for (int interleaved = 0; interleaved < 2; interleaved++) for (int with_bias = 0; with_bias < 2; with_bias++) for (int grid : {1, 5, 200}) {
        int nh = 4, nkv = 2, d = 16, k = 64, half = d / 2, qd = nh * d, kvd = nkv * d, width = qd + 2 * kvd;
        int block_size = 16, positions = 64, p = 37, stride = 4, seq = 1;
        auto W = rh((size_t)width * k, 0.2f);
        auto x = rv(k), nw = rv(k), bias = rv(width);
        std::vector<float> cs(positions * half), sn(positions * half);
        for (int i = 0; i < positions * half; i++) { cs[i] = std::cos(0.01f * i); sn[i] = std::sin(0.01f * i); }
        std::vector<int> pos{p}, row_seq{seq}, tables(3 * stride, 0);
        tables[seq * stride + p / block_size] = 2;  // block 2
        int blocks = 4;
        size_t cache = (size_t)blocks * block_size * kvd;
        // Reference: rms_norm -> host product -> qkv_rope_store.
        std::vector<__half> h(k);
        LoraStack none{};
        auto xc = x;
        emu_launch(rms_norm, dim3{1}, dim3{256}, xc.data(), (const float*)nw.data(), (const int*)nullptr, h.data(), (float*)nullptr, k, 1e-6f, (const float*)nullptr, (const int*)nullptr, none);
        std::vector<float> qkv(width);
        for (int o = 0; o < width; o++) qkv[o] = (float)dot(&W[(size_t)o * k], h.data(), k);
        std::vector<float> q_ref(qd), q(qd);
        std::vector<__half> kc_ref(cache, __float2half(0)), vc_ref(cache, __float2half(0)), kc(cache, __float2half(0)), vc(cache, __float2half(0));
        const float* b = with_bias ? bias.data() : nullptr;
        emu_launch(qkv_rope_store, dim3{1, (unsigned)(nh + nkv)}, dim3{32}, (const float*)qkv.data(), b, (const float*)cs.data(), (const float*)sn.data(), (const int*)pos.data(), (const int*)row_seq.data(), (const int*)tables.data(), stride,
                   q_ref.data(), (void*)kc_ref.data(), (void*)vc_ref.data(), nh, nkv, d, block_size, interleaved, 0, (const float*)nullptr, (const int*)nullptr, none);
        emu_launch(gemv_qkv_rope, dim3{(unsigned)grid}, dim3{256}, (const __half*)W.data(), k, (const float*)x.data(), (const float*)nw.data(), 1e-6f, b, (const float*)cs.data(), (const float*)sn.data(), (const int*)pos.data(),
                   (const int*)row_seq.data(), (const int*)tables.data(), stride, q.data(), kc.data(), vc.data(), nh, nkv, d, block_size, interleaved);
        for (int i = 0; i < qd; i++) check(std::fabs(q[i] - q_ref[i]) < 1e-4 * (1 + std::fabs(q_ref[i])), "gemv_qkv_rope q", q[i], q_ref[i]);
        int written = 0;
        for (size_t i = 0; i < cache; i++) {
            float a = __half2float(kc[i]), r = __half2float(kc_ref[i]);
            check(std::fabs(a - r) <= 2e-3 * (1 + std::fabs(r)), "gemv_qkv_rope k cache", a, r);
            a = __half2float(vc[i]); r = __half2float(vc_ref[i]);
            check(std::fabs(a - r) <= 2e-3 * (1 + std::fabs(r)), "gemv_qkv_rope v cache", a, r);
            written += r != 0.0f;
        }
        check(written == kvd, "cache entries written", written, kvd);
    }
    printf("gemv_qkv_rope: interleaved 0/1, bias 0/1, grids 1/5/200: done\n");
}

// The readers with LoRA stacks against the same readers fed the equal update through `z`.
static void test_stack_readers() {
    int rows = 5, slots = 3, rank = 4;
    std::vector<int> row_stack{1, -1, 0, 2, 1};
    auto update = [&](const std::vector<float>& t, const std::vector<float>& bt, int count, int width, int c, int j, int r) {
        int s = row_stack[r];
        if (s < 0) return 0.0f;
        double acc = 0;
        for (int kk = 0; kk < rank; kk++) acc += (double)t[(size_t)r * slots * count * rank + (s * count + j) * rank + kk] * bt[((size_t)s * rank + kk) * width + c];
        return (float)acc;
    };
    // rms_norm (count 1): the update joins x in place, then the norm.
    {
        int hidden = 40, count = 1, tcols = slots * count * rank;
        auto t = rv((size_t)rows * tcols), bt = rv((size_t)slots * rank * hidden), x = rv((size_t)rows * hidden), w = rv(hidden);
        std::vector<float> z((size_t)rows * hidden);
        for (int r = 0; r < rows; r++) for (int c = 0; c < hidden; c++) z[r * hidden + c] = update(t, bt, count, hidden, c, 0, r);
        LoraStack ls{t.data(), row_stack.data(), bt.data(), tcols, hidden, rank, count}, none{};
        auto x1 = x, x2 = x;
        std::vector<float> o1((size_t)rows * hidden), o2((size_t)rows * hidden);
        emu_launch(rms_norm, dim3{(unsigned)rows}, dim3{256}, x1.data(), (const float*)w.data(), (const int*)nullptr, (__half*)nullptr, o1.data(), hidden, 1e-6f, (const float*)nullptr, (const int*)nullptr, ls);
        emu_launch(rms_norm, dim3{(unsigned)rows}, dim3{256}, x2.data(), (const float*)w.data(), (const int*)nullptr, (__half*)nullptr, o2.data(), hidden, 1e-6f, (const float*)z.data(), (const int*)row_stack.data(), none);
        for (size_t i = 0; i < x1.size(); i++) { check(std::fabs(x1[i] - x2[i]) < 1e-5, "rms_norm stacks x", x1[i], x2[i]); check(std::fabs(o1[i] - o2[i]) < 1e-4, "rms_norm stacks out", o1[i], o2[i]); }
        // The final norm's row map: logit rows 3 and 0.
        std::vector<int> map{3, 0};
        x1 = x; x2 = x;
        emu_launch(rms_norm, dim3{2}, dim3{256}, x1.data(), (const float*)w.data(), (const int*)map.data(), (__half*)nullptr, o1.data(), hidden, 1e-6f, (const float*)nullptr, (const int*)nullptr, ls);
        emu_launch(rms_norm, dim3{2}, dim3{256}, x2.data(), (const float*)w.data(), (const int*)map.data(), (__half*)nullptr, o2.data(), hidden, 1e-6f, (const float*)z.data(), (const int*)row_stack.data(), none);
        for (int i = 0; i < 2 * hidden; i++) check(std::fabs(o1[i] - o2[i]) < 1e-4, "rms_norm stacks, row map", o1[i], o2[i]);
    }
    // silu_mul (count 2: gate, then up at column inter + j).
    {
        int inter = 300, count = 2, tcols = slots * count * rank, width = 2 * inter;
        auto t = rv((size_t)rows * tcols), bt = rv((size_t)slots * rank * width), gu = rv((size_t)rows * width, 2.0f);
        std::vector<float> z((size_t)rows * width);
        for (int r = 0; r < rows; r++) for (int c = 0; c < width; c++) z[r * width + c] = update(t, bt, count, width, c, c < inter ? 0 : 1, r);
        LoraStack ls{t.data(), row_stack.data(), bt.data(), tcols, width, rank, count}, none{};
        std::vector<float> o1((size_t)rows * inter), o2((size_t)rows * inter);
        emu_launch(silu_mul, dim3{(unsigned)rows, 2}, dim3{256}, (const float*)gu.data(), (__half*)nullptr, o1.data(), inter, (const float*)nullptr, (const int*)nullptr, ls);
        emu_launch(silu_mul, dim3{(unsigned)rows, 2}, dim3{256}, (const float*)gu.data(), (__half*)nullptr, o2.data(), inter, (const float*)z.data(), (const int*)row_stack.data(), none);
        for (size_t i = 0; i < o1.size(); i++) check(std::fabs(o1[i] - o2[i]) < 1e-4 * (1 + std::fabs(o2[i])), "silu_mul stacks", o1[i], o2[i]);
    }
    // qkv_rope_store (count 3: q, k, v columns).
    {
        int nh = 4, nkv = 2, d = 16, qd = nh * d, kvd = nkv * d, width = qd + 2 * kvd, count = 3, tcols = slots * count * rank, block_size = 16, stride = 4;
        auto t = rv((size_t)rows * tcols), bt = rv((size_t)slots * rank * width), qkv = rv((size_t)rows * width), bias = rv(width);
        std::vector<float> z((size_t)rows * width);
        for (int r = 0; r < rows; r++) for (int c = 0; c < width; c++) z[r * width + c] = update(t, bt, count, width, c, c < qd ? 0 : c < qd + kvd ? 1 : 2, r);
        std::vector<float> cs(64 * d / 2), sn(64 * d / 2);
        for (size_t i = 0; i < cs.size(); i++) { cs[i] = std::cos(0.02f * i); sn[i] = std::sin(0.02f * i); }
        std::vector<int> pos{3, 9, 17, 1, 30}, seqs{0, 1, 2, 3, 4}, tables(5 * stride);
        for (int s = 0; s < 5; s++) for (int b = 0; b < stride; b++) tables[s * stride + b] = s * stride + b;
        size_t cache = (size_t)5 * stride * block_size * kvd;
        LoraStack ls{t.data(), row_stack.data(), bt.data(), tcols, width, rank, count}, none{};
        std::vector<float> q1((size_t)rows * qd), q2((size_t)rows * qd), k1(cache), k2(cache), v1(cache), v2(cache);
        emu_launch(qkv_rope_store, dim3{(unsigned)rows, (unsigned)(nh + nkv)}, dim3{32}, (const float*)qkv.data(), (const float*)bias.data(), (const float*)cs.data(), (const float*)sn.data(), (const int*)pos.data(), (const int*)seqs.data(), (const int*)tables.data(), stride,
                   q1.data(), (void*)k1.data(), (void*)v1.data(), nh, nkv, d, block_size, 0, 1, (const float*)nullptr, (const int*)nullptr, ls);
        emu_launch(qkv_rope_store, dim3{(unsigned)rows, (unsigned)(nh + nkv)}, dim3{32}, (const float*)qkv.data(), (const float*)bias.data(), (const float*)cs.data(), (const float*)sn.data(), (const int*)pos.data(), (const int*)seqs.data(), (const int*)tables.data(), stride,
                   q2.data(), (void*)k2.data(), (void*)v2.data(), nh, nkv, d, block_size, 0, 1, (const float*)z.data(), (const int*)row_stack.data(), none);
        for (size_t i = 0; i < q1.size(); i++) check(std::fabs(q1[i] - q2[i]) < 1e-4, "qkv_rope_store stacks q", q1[i], q2[i]);
        for (size_t i = 0; i < cache; i++) { check(std::fabs(k1[i] - k2[i]) < 1e-4, "qkv_rope_store stacks k", k1[i], k2[i]); check(std::fabs(v1[i] - v2[i]) < 1e-4, "qkv_rope_store stacks v", v1[i], v2[i]); }
    }
    printf("stack readers: rms_norm (with and without a row map), silu_mul, qkv_rope_store against the z path: done\n");
}

// attend: each row's query against its sequence's cached positions 0..=pos (paged, GQA), f32
// and f16 caches, one tile of positions and several (the warps' partial softmaxes merged).
static void test_attend() {
    int nh = 4, nkv = 2, block_size = 16, stride = 88;
    for (int threads : {256, 1024}) for (int kv32 = 0; kv32 < 2; kv32++) for (int d : {16, 36, 64, 128}) {
        if (threads == 1024 && (d == 16 || d == 64)) continue;  // the wide blocks: two head sizes are enough
        int kvd = nkv * d, rows = 4, seqs = 3, blocks = seqs * stride;
        std::vector<int> pos{0, 40, 1300, 7}, row_seq{2, 0, 1, 0}, tables(seqs * stride);
        for (int i = 0; i < seqs * stride; i++) tables[i] = (i * 7) % blocks;  // scattered blocks
        auto q = rv((size_t)rows * nh * d), kf = rv((size_t)blocks * block_size * kvd), vf = rv((size_t)blocks * block_size * kvd);
        std::vector<__half> kh(kf.size()), vh(vf.size());
        for (size_t i = 0; i < kf.size(); i++) { kh[i] = __float2half(kf[i]); vh[i] = __float2half(vf[i]); kf[i] = __half2float(kh[i]); vf[i] = __half2float(vh[i]); }
        std::vector<float> out((size_t)rows * nh * d);
        float scale = 1.0f / std::sqrt((float)d);
        const void* kc = kv32 ? (const void*)kf.data() : (const void*)kh.data();
        const void* vc = kv32 ? (const void*)vf.data() : (const void*)vh.data();
        emu_launch(attend, dim3{(unsigned)nh, (unsigned)rows}, dim3{(unsigned)threads}, (const float*)q.data(), kc, vc, (const int*)pos.data(), (const int*)row_seq.data(), (const int*)tables.data(), stride,
                   (__half*)nullptr, out.data(), nh, nkv, d, block_size, scale, kv32);
        for (int r = 0; r < rows; r++) for (int h = 0; h < nh; h++) {
            int kvh = h / (nh / nkv);
            std::vector<double> sc(pos[r] + 1);
            double mx = -1e300, l = 0;
            for (int p = 0; p <= pos[r]; p++) {
                size_t base = ((size_t)tables[row_seq[r] * stride + p / block_size] * block_size + p % block_size) * kvd + kvh * d;
                double s = 0;
                for (int i = 0; i < d; i++) s += (double)q[((size_t)r * nh + h) * d + i] * scale * kf[base + i];
                sc[p] = s;
                mx = std::max(mx, s);
            }
            for (auto& s : sc) { s = std::exp(s - mx); l += s; }
            for (int i = 0; i < d; i++) {
                double o = 0;
                for (int p = 0; p <= pos[r]; p++) o += sc[p] * vf[((size_t)tables[row_seq[r] * stride + p / block_size] * block_size + p % block_size) * kvd + kvh * d + i];
                o /= l;
                float got = out[((size_t)r * nh + h) * d + i];
                check(std::fabs(got - o) < 1e-4, "attend", got, o);
            }
        }
    }
    printf("attend: blocks of 8 and 32 warps, f16 and f32 caches, head sizes 16, 36, 64 and 128, positions 0-1300 of scattered blocks: done\n");
}

// argmax_part + argmax_rows: the lowest index of the largest logit; NaN never wins; a row of
// -inf and NaN gives 0.
static void test_argmax() {
    int vocab = 5003, rows = 5;
    auto l = rv((size_t)rows * vocab);
    l[1 * vocab + 4000] = 9.0f; l[1 * vocab + 17] = 9.0f;            // a tie: 17 wins
    l[2 * vocab + 5] = NAN; l[2 * vocab + 4999] = 3.0f;              // NaN never wins
    for (int j = 0; j < vocab; j++) l[3 * vocab + j] = j % 2 ? -INFINITY : NAN;  // nothing finite
    l[4 * vocab + vocab - 1] = 5.0f;                                 // the last slice's last entry
    std::vector<float> pv((size_t)rows * ARGMAX_SLICES);
    std::vector<int> pi((size_t)rows * ARGMAX_SLICES), ids(rows, -1);
    emu_launch(argmax_part, dim3{(unsigned)rows, ARGMAX_SLICES}, dim3{256}, (const float*)l.data(), vocab, pv.data(), pi.data());
    emu_launch(argmax_rows, dim3{(unsigned)rows}, dim3{32}, (const float*)pv.data(), (const int*)pi.data(), ids.data());
    for (int r = 0; r < rows; r++) {
        int want = 0;
        float best = -INFINITY;
        for (int j = 0; j < vocab; j++) if (l[(size_t)r * vocab + j] > best) { best = l[(size_t)r * vocab + j]; want = j; }
        check(ids[r] == want, "argmax", ids[r], want);
    }
    check(ids[1] == 17 && ids[2] == 4999 && ids[3] == 0 && ids[4] == vocab - 1, "argmax cases", ids[1], 17);
    printf("argmax: ties, NaN, a row without a finite logit, the last entry: done\n");
}

// lora_update (the tiled kernel): each adapter row's `scale B (A x)` for every module of a group,
// zeros where its adapter has none; rows of the base model untouched; fewer tile blocks than
// tiles, so blocks take several.
static void test_lora_update() {
    struct Mod { int out, col; };
    const Mod mods[3] = {{300, 0}, {32, 300}, {32, 332}};  // q, k, v of a product row of 364
    int layers = 2, layer = 1, in_dim = 64, z_stride = 364, slots = 3;
    std::vector<std::vector<float>> keep;
    std::vector<LoraEntry> table((size_t)slots * layers * 7);
    const int ranks[3][3] = {{8, 8, 8}, {4, 0, 4}, {0, 16, 0}};
    const float scales[3] = {2.0f, 0.5f, 1.25f};
    for (int s = 0; s < slots; s++) for (int j = 0; j < 3; j++) {
        LoraEntry& e = table[((size_t)s * layers + layer) * 7 + j];
        e.rank = ranks[s][j]; e.scale = scales[s]; e.out_dim = mods[j].out; e.col = mods[j].col;
        keep.push_back(rv((size_t)std::max(1, e.rank) * in_dim)); e.a = keep.back().data();
        keep.push_back(rv((size_t)std::max(1, e.rank) * e.out_dim)); e.bt = keep.back().data();
    }
    std::vector<int> row_slot{0, -1, 2, 1, 0, 0, 1, -1, 2, 0, 0, 1, 0};
    int rows = row_slot.size();
    // lora::tiles: rows gathered by adapter into tiles of LORA_TILE.
    std::vector<int> tiles{0};
    for (int s = 0; s < slots; s++) {
        std::vector<int> rs;
        for (int r = 0; r < rows; r++) if (row_slot[r] == s) rs.push_back(r);
        for (size_t i = 0; i < rs.size(); i += LORA_TILE) {
            tiles.push_back(s);
            for (int t = 0; t < LORA_TILE; t++) tiles.push_back(i + t < rs.size() ? rs[i + t] : -1);
            tiles[0]++;
        }
    }
    auto x = rv((size_t)rows * in_dim);
    for (int blocks : {1, 2, 9}) {
        std::vector<float> z((size_t)rows * z_stride, 777.0f);
        int col_blocks = 2;  // the widest module (300) takes two blocks of LORA_THREADS columns; k and v one
        emu_launch(lora_update, dim3{(unsigned)blocks, 3u * col_blocks}, dim3{LORA_THREADS}, (const LoraEntry*)table.data(), layer, layers, 0, (const int*)tiles.data(), (const __half*)nullptr, (const float*)x.data(), in_dim, z.data(), z_stride, col_blocks);
        for (int r = 0; r < rows; r++) for (int j = 0; j < 3; j++) for (int o = 0; o < mods[j].out; o++) {
            float got = z[(size_t)r * z_stride + mods[j].col + o];
            if (row_slot[r] < 0) { check(got == 777.0f, "lora_update base row untouched", got, 777.0f); continue; }
            const LoraEntry& e = table[((size_t)row_slot[r] * layers + layer) * 7 + j];
            double want = 0;
            for (int k = 0; k < e.rank; k++) {
                double t = 0;
                for (int i = 0; i < in_dim; i++) t += (double)e.a[(size_t)k * in_dim + i] * x[(size_t)r * in_dim + i];
                want += e.scale * t * e.bt[(size_t)k * e.out_dim + o];
            }
            check(std::fabs(got - want) < 1e-4 * (1 + std::fabs(want)), "lora_update", got, want);
        }
    }
    printf("lora_update: 3 adapters (modules of rank 0-16), 13 rows, 1/2/9 tile blocks: done\n");
}

// sample_rows (the device sampler) against its specification run sequentially: weights
// exp((l - max) / T), the k-th largest weight's cut (ties kept), the top-p cut over 2^-40 fixed-
// point masses, min-p, then the draw of u * total in id order. Rows with ties at the cuts, u at
// 0 and near 1, and an off row, whose greedy pick stands.
static int sample_reference(std::vector<float> l, const SampleParams& p) {
    int vocab = l.size();
    float mx = -INFINITY;
    for (float v : l) mx = std::fmax(mx, v);
    std::vector<float> w(vocab);
    for (int j = 0; j < vocab; j++) { float e = expf((l[j] - mx) * p.inv_t); w[j] = std::isnan(e) ? 0.0f : e; }
    auto bits = [](float f) { return __float_as_uint(f); };
    auto fixed = [](float f) { return (unsigned long long)((double)f * FIXED_ONE); };
    unsigned cut = 0;
    std::vector<float> sorted(w);
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    if (p.top_k > 0 && p.top_k < vocab) cut = bits(sorted[p.top_k - 1]);
    if (p.top_p < 1.0f) {
        unsigned long long mass = 0;
        for (float v : w) if (bits(v) >= cut) mass += fixed(v);
        unsigned long long need = (unsigned long long)((double)p.top_p * (double)mass), acc = 0;
        if (need == 0) need = 1;
        unsigned c2 = cut;
        for (float v : sorted) {
            if (bits(v) < cut) break;
            acc += fixed(v);
            c2 = bits(v);
            if (acc >= need) break;
        }
        // every element of the cut's value is kept
        cut = c2;
    }
    if (p.min_p > 0.0f) cut = std::max(cut, bits(std::fmin(p.min_p, 1.0f)));
    unsigned long long total = 0;
    for (float v : w) if (bits(v) >= cut) total += fixed(v);
    unsigned long long target = (unsigned long long)(p.u * (double)total), cum = 0;
    if (target >= total) target = total - 1;
    for (int j = 0; j < vocab; j++) {
        if (bits(w[j]) < cut) continue;
        cum += fixed(w[j]);
        if (target < cum) return j;
    }
    return -1;
}

static void test_sample_rows() {
    int vocab = 3001;
    std::vector<SampleParams> ps;
    auto P = [](float t, int k, float top_p, float min_p, double u, int on = 1) { return SampleParams{1.0f / t, k, top_p, min_p, u, on, 0}; };
    ps.push_back(P(0.7f, 40, 0.9f, 0.0f, 0.37));
    ps.push_back(P(1.0f, 0, 1.0f, 0.05f, 0.61));
    ps.push_back(P(1.5f, 1, 1.0f, 0.0f, 0.99));
    ps.push_back(P(0.3f, vocab + 5, 0.5f, 0.0f, 0.999999));
    ps.push_back(P(1.0f, 50, 0.95f, 0.1f, 0.0));
    ps.push_back(P(2.0f, 0, 0.8f, 0.0f, 0.5));
    ps.push_back(P(1.0f, 10, 1.0f, 0.0f, 0.5, 0));  // off: the greedy pick (preset) stands
    int rows = ps.size();
    for (int trial = 0; trial < 3; trial++) {
        std::vector<float> l((size_t)rows * vocab);
        for (int r = 0; r < rows; r++) for (int j = 0; j < vocab; j++) {
            float v = rnd(4.0f);
            l[(size_t)r * vocab + j] = trial == 1 ? std::round(v * 2) / 2 : v;  // trial 1: many ties
        }
        std::vector<int> ids(rows, 123);
        auto w = l;
        emu_launch(sample_rows, dim3{(unsigned)rows}, dim3{SAMPLE_THREADS}, w.data(), vocab, (const SampleParams*)ps.data(), ids.data());
        for (int r = 0; r < rows; r++) {
            int want = ps[r].on ? sample_reference(std::vector<float>(l.begin() + (size_t)r * vocab, l.begin() + (size_t)(r + 1) * vocab), ps[r]) : 123;
            check(ids[r] == want, "sample_rows", ids[r], want);
        }
    }
    printf("sample_rows: 6 parameter sets and an off row, 3 trials (one with many ties): done\n");
}

// The small kernels: embedding lookups, the f16 -> f32 widening, the block-table scatter and
// async scheduling's gather of the last step's picks.
static void test_small_kernels() {
    int vocab = 50, hidden = 300;
    auto table32 = rv((size_t)vocab * hidden);
    auto table16 = rh((size_t)vocab * hidden);
    std::vector<int> ids{7, 0, 49, 7};
    std::vector<float> x32(ids.size() * hidden), x16(ids.size() * hidden);
    emu_launch(embed_f32, dim3{(unsigned)ids.size()}, dim3{256}, (const float*)table32.data(), (const int*)ids.data(), x32.data(), hidden);
    emu_launch(embed_f16, dim3{(unsigned)ids.size()}, dim3{256}, (const __half*)table16.data(), (const int*)ids.data(), x16.data(), hidden);
    for (size_t r = 0; r < ids.size(); r++) for (int j = 0; j < hidden; j++) {
        check(x32[r * hidden + j] == table32[(size_t)ids[r] * hidden + j], "embed_f32", x32[r * hidden + j], table32[(size_t)ids[r] * hidden + j]);
        check(x16[r * hidden + j] == __half2float(table16[(size_t)ids[r] * hidden + j]), "embed_f16", x16[r * hidden + j], 0);
    }
    std::vector<float> wide(1000);
    emu_launch(f16_to_f32, dim3{2}, dim3{128}, (const __half*)table16.data(), wide.data(), (long long)wide.size());
    for (size_t i = 0; i < wide.size(); i++) check(wide[i] == __half2float(table16[i]), "f16_to_f32", wide[i], __half2float(table16[i]));
    std::vector<int> dst(20, -1), pairs{3, 30, 17, 170, 0, 1};
    emu_launch(scatter_i32, dim3{1}, dim3{256}, dst.data(), (const int*)pairs.data(), 3);
    for (int i = 0; i < 20; i++) { int want = i == 3 ? 30 : i == 17 ? 170 : i == 0 ? 1 : -1; check(dst[i] == want, "scatter_i32", dst[i], want); }
    std::vector<int> step_ids{5, 6, 7, 8}, picks{100, 200, 300}, follows{1, 2, 3, 0};
    emu_launch(gather_ids, dim3{1}, dim3{256}, step_ids.data(), (const int*)picks.data(), (const int*)follows.data(), 2);
    int want[4] = {5, 300, 7, 100};
    for (int i = 0; i < 4; i++) check(step_ids[i] == want[i], "gather_ids", step_ids[i], want[i]);
    printf("embed_f32, embed_f16, f16_to_f32, scatter_i32, gather_ids: done\n");
}

int main() {
    test_small_kernels();
    test_sample_rows();
    test_attend();
    test_argmax();
    test_lora_update();
    test_gemv_row();
    test_gemv_qkv_rope();
    test_stack_readers();
    printf("%d failures\n", failures);
    return failures != 0;
}
