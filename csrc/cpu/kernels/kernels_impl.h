// The CPU kernels of kernels.h, written once with at::vec::Vectorized and compiled once per CPU
// capability: capability_*.cpp define CPU_CAPABILITY (the namespace, as in ATen) and the
// CPU_CAPABILITY_* macro that selects the vector width, then include this file. Do not include it
// anywhere else.
//
// Vector exp/log are ATen's (Sleef on AVX2/AVX-512, libm per lane on the baseline). Reductions add
// in a fixed order for a given capability, so results do not depend on the thread count.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels_impl.h is compiled through capability_*.cpp only"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "kernels.h"

namespace mnist_fast {
namespace cpu {
namespace CPU_CAPABILITY {

using namespace row_math;

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// ---- loads and stores of n <= L values of scalar_t as a vector of acc_t ----

// (always inlined: as calls, g++ passed each vector through memory and bfloat16 passes ran at a
// third of their speed)
template <typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE Vec<acc_t> load(const scalar_t* p, int64_t n, acc_t fill = acc_t(0)) {
  constexpr int64_t L = Vec<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n == L) return Vec<acc_t>::loadu(p);
    return Vec<acc_t>::set(Vec<acc_t>(fill), Vec<acc_t>::loadu(p, n), n);
  } else {  // bfloat16 / float16 (acc_t float)
    if (n == L) {
      Vec<acc_t> v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
    alignas(64) acc_t buf[L];
    for (int64_t k = 0; k < L; ++k) buf[k] = k < n ? static_cast<acc_t>(p[k]) : fill;
    return Vec<acc_t>::loadu(buf);
  }
}

template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void store(scalar_t* p, const Vec<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, n);
  } else {  // rounded as static_cast does (round to nearest even)
    const Vec<scalar_t> packed = at::vec::convert_from_float<scalar_t>(v, v);  // v's L values, twice
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // A full vector's worth is the low half of `packed`: one plain store (Vectorized::store(p, n)
    // with n below its 2L lanes goes through a buffer and memcpy, which made bfloat16 passes slower
    // than stock's).
    if (n == Vec<acc_t>::size()) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(__m512i(packed)));
#else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(__m256i(packed)));
#endif
      return;
    }
#endif
    packed.store(p, n);
  }
}

// The first n lanes of v, the others zero (partial sums over a row's tail).
template <typename acc_t>
inline Vec<acc_t> first_lanes(const Vec<acc_t>& v, int64_t n) {
  return n == Vec<acc_t>::size() ? v : Vec<acc_t>::set(Vec<acc_t>(0), v, n);
}

template <typename acc_t>
inline acc_t lane_sum(const Vec<acc_t>& v) {
  alignas(64) acc_t b[Vec<acc_t>::size()];
  v.store(b);
  acc_t s = 0;
  for (int64_t k = 0; k < Vec<acc_t>::size(); ++k) s += b[k];
  return s;
}

template <typename acc_t>
inline acc_t lane_max(const Vec<acc_t>& v) {
  alignas(64) acc_t b[Vec<acc_t>::size()];
  v.store(b);
  acc_t m = b[0];
  for (int64_t k = 1; k < Vec<acc_t>::size(); ++k) m = nan_max(m, b[k]);
  return m;
}

// relu (row_math::bias_relu) and its gradient (row_math::relu_grad) on vectors: NaN passes through.
template <typename acc_t>
inline Vec<acc_t> relu(const Vec<acc_t>& v) {
  return Vec<acc_t>::blendv(v, Vec<acc_t>(0), v < Vec<acc_t>(0));
}

template <typename acc_t>
inline Vec<acc_t> relu_grad(const Vec<acc_t>& grad, const Vec<acc_t>& output) {
  return Vec<acc_t>::blendv(grad, Vec<acc_t>(0), output <= Vec<acc_t>(0));
}

// exp of the kernels' arguments x - max (- log-sum), all <= 0 or NaN. float on AVX2/AVX-512:
// ATen's inline exp_u20 (within 20 ulp; no call, so the class loop is scheduled as one block),
// with NaN passed through (its clamping would turn NaN into a huge number). Else Vectorized::exp
// (Sleef u10 on AVX2/AVX-512, libm per lane on the baseline).
template <typename acc_t>
inline Vec<acc_t> exp_nonpositive(const Vec<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return Vec<acc_t>::blendv(x.exp_u20(), x, x.isnan());
#endif
  return x.exp();
}

// p = exp(-(-log p)) from the row's max and log-sum (row_math::neg_log_prob).
template <typename acc_t>
inline Vec<acc_t> softmax_of(const Vec<acc_t>& x, const Vec<acc_t>& row_max, const Vec<acc_t>& log_sum) {
  return exp_nonpositive(neg_log_prob(x, row_max, log_sum).neg());
}

// ---- transposes between n <= L rows of C <= kShortRow values (row-major, contiguous: element
// (r, c) at rows[r * C + c]) and C columns of L lanes (at cols[c * L + r]) ----

template <bool kToColumns, typename acc_t>
inline void transpose_block(const acc_t* src, int64_t n, int64_t C, acc_t* dst) {
  constexpr int64_t L = Vec<acc_t>::size();
  const int64_t src_ld = kToColumns ? C : L, dst_ld = kToColumns ? L : C;  // strides of a row / a column
  auto copy_columns = [&](int64_t c0) {  // columns c0.. one value at a time
    for (int64_t c = c0; c < C; ++c) {
      for (int64_t r = 0; r < n; ++r) {
        if constexpr (kToColumns) dst[c * L + r] = src[r * C + c];
        else dst[r * C + c] = src[c * L + r];
      }
    }
  };
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kToColumns && std::is_same_v<acc_t, float>) {  // a hardware gather per class (faster here
    using Index = at::vec::Vectorized<int32_t>;                 // than register transposes)
    const Index index = at::vec::minimum(Index::arange(0, 1), Index(static_cast<int32_t>(n - 1))) *
                        Index(static_cast<int32_t>(C));
    for (int64_t c = 0; c < C; ++c) at::vec::gather<sizeof(float)>(src + c, index).store(dst + c * L);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n == L) {  // 8x8 register transposes, then the last C % 8 classes one by one
      int64_t c0 = 0;
      for (; c0 + L <= C; c0 += L) {
        const int64_t src0 = kToColumns ? c0 : c0 * L, dst0 = kToColumns ? c0 * L : c0;
        at::vec::transpose_mxn<float, 8, 8>(src + src0, src_ld, dst + dst0, dst_ld);
      }
      copy_columns(c0);
      return;
    }
  }
#endif
  (void)src_ld;
  (void)dst_ld;
  copy_columns(0);
}

// ---- cross-entropy ----

template <typename scalar_t>
struct CrossEntropyKernels {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  using Args = CrossEntropyArgs<scalar_t>;
  static constexpr int64_t L = V::size();

  static acc_t weight(const Args& a, int64_t c) { return a.weight ? a.weight[c] : acc_t(1); }
  static V weights(const Args& a, int64_t c0, int64_t n) { return a.weight ? load<acc_t>(a.weight + c0, n) : V(1); }
  static acc_t grad_of_row(const Args& a, int64_t i) { return a.grad_rows ? a.grad_rows[i] : a.grad_scalar; }

  // Gradient scales of class-index row i (row_math: a, b and the class-independent a + b W).
  // mean_grad: a reduced loss's grad / target_weight_sum, divided once per call instead of per row.
  static IndexGradScales<acc_t> index_scales(const Args& a, int64_t i, acc_t mean_grad) {
    const int64_t y = a.target[i];
    if (y == a.ignore_index) return ignored_row_grad_scales(a.opts);
    if (!a.grad_rows && a.reduction == kMean) return index_grad_scales(mean_grad, weight(a, y), kSum, acc_t(1), a.opts);
    return index_grad_scales(grad_of_row(a, i), weight(a, y), a.reduction, a.target_weight_sum, a.opts);
  }
  static acc_t mean_grad(const Args& a) { return a.grad_scalar / a.target_weight_sum; }

  // -- short rows: up to L rows at once, one row per lane; column c of the block is class c --
  struct Block {
    alignas(64) acc_t v[kShortRow][L];
    // Rows r < n of a (rows, classes) matrix; the lanes of missing rows repeat row n - 1.
    void load_rows(const scalar_t* x, int64_t n, int64_t classes) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        transpose_block<true>(x, n, classes, &v[0][0]);
      } else {  // bfloat16 / float16: converted as contiguous vectors first
        alignas(64) acc_t flat[kShortRow * L];
        for (int64_t k = 0; k < n * classes; k += L) load<acc_t>(x + k, std::min(L, n * classes - k)).store(flat + k);
        transpose_block<true>(flat, n, classes, &v[0][0]);
      }
      for (int64_t c = 0; c < classes; ++c) {
        for (int64_t r = n; r < L; ++r) v[c][r] = v[c][n - 1];
      }
    }
    void store_rows(scalar_t* x, int64_t n, int64_t classes) const {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        transpose_block<false>(&v[0][0], n, classes, x);
      } else {
        alignas(64) acc_t flat[kShortRow * L];
        transpose_block<false>(&v[0][0], n, classes, flat);
        for (int64_t k = 0; k < n * classes; k += L) store(x + k, V::loadu(flat + k), std::min(L, n * classes - k));
      }
    }
    V column(int64_t c) const { return V::loadu(v[c]); }
    void set_column(int64_t c, const V& value) { value.store(v[c]); }
  };

  // Row stats of a block, per lane: max (NaN-propagating), the sum s of exp(x - max) and log(s);
  // the exps themselves go to *exps when it is given.
  static void block_stats(const Block& x, int64_t classes, V& row_max, V& sum, V& log_sum, Block* exps = nullptr) {
    // Two chains of maxima and of sums: one would wait on each add's latency, class after class.
    V m0 = x.column(0), m1 = x.column(classes > 1 ? 1 : 0);
    for (int64_t c = 2; c + 1 < classes; c += 2) {
      m0 = at::vec::maximum(m0, x.column(c));
      m1 = at::vec::maximum(m1, x.column(c + 1));
    }
    if (classes > 2 && classes % 2) m0 = at::vec::maximum(m0, x.column(classes - 1));
    row_max = at::vec::maximum(m0, m1);
    V s0(0), s1(0);
    for (int64_t c = 0; c < classes; ++c) {
      const V e = exp_nonpositive(x.column(c) - row_max);
      if (exps) exps->set_column(c, e);
      if (c % 2) s1 = s1 + e;
      else s0 = s0 + e;
    }
    sum = s0 + s1;
    log_sum = sum.log();
  }

  static void forward_short(const Args& a, int64_t r0, int64_t n, acc_t* sums) {
    Block x;
    x.load_rows(a.input + r0 * a.classes, n, a.classes);
    V m, s, ls;
    block_stats(x, a.classes, m, s, ls);
    forward_short_terms(a, r0, n, x, m, ls, sums);
  }

  // forward_short after the block's stats: saves them, and adds the rows' loss terms to sums.
  static void forward_short_terms(const Args& a, int64_t r0, int64_t n, const Block& x, const V& m, const V& ls,
                                  acc_t* sums) {
    const int64_t C = a.classes;
    alignas(64) acc_t mx[L], lsum[L], term[L];
    m.store(mx);
    ls.store(lsum);
    for (int64_t r = 0; r < n; ++r) save_row_stats(a.stats + kRowStats * (r0 + r), mx[r], lsum[r]);
    if (a.target) {
      V smooth(0);
      if (a.opts.smoothing) {
        for (int64_t c = 0; c < C; ++c) smooth = smooth + V(weight(a, c)) * neg_log_prob(x.column(c), m, ls);
      }
      smooth.store(term);
      // (the running sums in registers: through the pointer, each row's add waited for the last one's store)
      acc_t nll_sum = sums[0], smooth_sum = sums[1];
      for (int64_t r = 0; r < n; ++r) {
        const int64_t y = a.target[r0 + r];
        acc_t nll = 0, sm = 0;
        if (y != a.ignore_index) {
          nll = weight(a, y) * neg_log_prob(x.v[y][r], mx[r], lsum[r]);
          sm = a.opts.smoothing ? term[r] : acc_t(0);
        }
        if (a.loss_rows) a.loss_rows[r0 + r] = static_cast<scalar_t>(index_row_loss(nll, sm, a.opts));
        nll_sum += nll;
        smooth_sum += sm;
      }
      sums[0] = nll_sum;
      sums[1] = smooth_sum;
    } else {
      Block t;
      t.load_rows(a.probs + r0 * C, n, C);
      V loss(0);
      for (int64_t c = 0; c < C; ++c) {
        const V wt = V(weight(a, c)) * a.opts.smoothed_target(t.column(c));
        loss = loss + prob_loss_term(neg_log_prob(x.column(c), m, ls), wt);
      }
      loss.store(term);
      acc_t loss_sum = sums[0];
      for (int64_t r = 0; r < n; ++r) {
        if (a.loss_rows) a.loss_rows[r0 + r] = static_cast<scalar_t>(term[r]);
        loss_sum += term[r];
      }
      sums[0] = loss_sum;
    }
  }

  // The per-row gradient scales of class-index rows [r0, r0 + n), one lane per row: filled before
  // the block's other work, so that by the time they are read as vectors the scalar stores have
  // retired (a vector load right after them waits for every one).
  struct IndexRowScales {
    alignas(64) acc_t a[L] = {}, b[L] = {}, scale[L] = {}, cls[L];
    IndexRowScales(const Args& args, int64_t r0, int64_t n) {
      for (int64_t r = 0; r < L; ++r) cls[r] = acc_t(-1);
      const acc_t mean = mean_grad(args);
      for (int64_t r = 0; r < n; ++r) {
        const auto s = index_scales(args, r0 + r, mean);
        a[r] = s.a;
        b[r] = s.b;
        scale[r] = index_grad_row_scale(args.weight_total, s);
        if (args.target[r0 + r] != args.ignore_index) cls[r] = static_cast<acc_t>(args.target[r0 + r]);
      }
    }
  };

  // The gradient rows [r0, r0 + n) of class-index targets, from the block's probabilities prob(c)
  // (class c's column).
  template <typename Probs>
  static void index_grad_short(const Args& a, int64_t r0, int64_t n, const IndexRowScales& rs, const Probs& prob) {
    const int64_t C = a.classes;
    const V g = V::loadu(rs.scale), va = V::loadu(rs.a), vb = V::loadu(rs.b), y = V::loadu(rs.cls);
    Block out;
    for (int64_t c = 0; c < C; ++c) {
      // (the class weight only enters with smoothing: not read otherwise)
      const V grad = index_grad_class(prob(c), g, vb, a.opts.smoothing ? V(weight(a, c)) : V(0), a.opts.smoothing);
      out.set_column(c, V::blendv(grad, grad - va, y == V(static_cast<acc_t>(c))));
    }
    out.store_rows(a.grad_input + r0 * C, n, C);
  }

  static void backward_short(const Args& a, int64_t r0, int64_t n) {
    const int64_t C = a.classes;
    alignas(64) acc_t mx[L] = {}, lsum[L] = {}, scale[L] = {};
    for (int64_t r = 0; r < n; ++r) {
      const SavedRowStats<acc_t> st(a.stats + kRowStats * (r0 + r));
      mx[r] = st.max;
      lsum[r] = st.log_sum;
    }
    if (a.target) {
      const IndexRowScales rs(a, r0, n);
      Block x;
      x.load_rows(a.input + r0 * C, n, C);
      const V m = V::loadu(mx), ls = V::loadu(lsum);
      index_grad_short(a, r0, n, rs, [&](int64_t c) { return softmax_of(x.column(c), m, ls); });
      return;
    }
    Block x;
    x.load_rows(a.input + r0 * C, n, C);
    const V m = V::loadu(mx), ls = V::loadu(lsum);
    for (int64_t r = 0; r < n; ++r) scale[r] = prob_grad_scale(grad_of_row(a, r0 + r), a.rows, a.reduction);
    const V g = V::loadu(scale);
    Block t, out;
    t.load_rows(a.probs + r0 * C, n, C);
    if (a.grad_input) {
      V total(0);
      for (int64_t c = 0; c < C; ++c) total = total + V(weight(a, c)) * a.opts.smoothed_target(t.column(c));
      for (int64_t c = 0; c < C; ++c) {
        const V wt = V(weight(a, c)) * a.opts.smoothed_target(t.column(c));
        out.set_column(c, prob_input_grad(softmax_of(x.column(c), m, ls), total, wt, g));
      }
      out.store_rows(a.grad_input + r0 * C, n, C);
    }
    if (a.grad_target) {
      for (int64_t c = 0; c < C; ++c) {
        out.set_column(c, prob_target_grad(neg_log_prob(x.column(c), m, ls), V(weight(a, c)), g, a.opts));
      }
      out.store_rows(a.grad_target + r0 * C, n, C);
    }
  }

  // -- long rows: one row at a time, vectorized along the row --
  // A row's max (NaN-propagating) and log(sum(exp(x - max))), vectorized along the row.
  static void row_stats_long(const scalar_t* x, int64_t C, acc_t& row_max, acc_t& log_sum) {
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    // Four accumulators each for the max and the sum: one would chain every vector's max or add
    // to the previous one's latency.
    V vm[4] = {V(kNegInf), V(kNegInf), V(kNegInf), V(kNegInf)};
    int64_t c0 = 0;
    for (; c0 + 4 * L <= C; c0 += 4 * L) {
      for (int k = 0; k < 4; ++k) vm[k] = at::vec::maximum(vm[k], load<acc_t>(x + c0 + k * L, L));
    }
    for (; c0 < C; c0 += L) vm[0] = at::vec::maximum(vm[0], load<acc_t>(x + c0, std::min(L, C - c0), kNegInf));
    const acc_t mx = lane_max(at::vec::maximum(at::vec::maximum(vm[0], vm[1]), at::vec::maximum(vm[2], vm[3])));
    const V m(mx);
    V vs[4] = {V(0), V(0), V(0), V(0)};  // the tail's fill of -inf adds exp(-inf) = 0 (or NaN where the row is)
    for (c0 = 0; c0 + 4 * L <= C; c0 += 4 * L) {
      for (int k = 0; k < 4; ++k) vs[k] = vs[k] + exp_nonpositive(load<acc_t>(x + c0 + k * L, L) - m);
    }
    for (; c0 < C; c0 += L) vs[0] = vs[0] + exp_nonpositive(load<acc_t>(x + c0, std::min(L, C - c0), kNegInf) - m);
    row_max = mx;
    log_sum = std::log(lane_sum((vs[0] + vs[1]) + (vs[2] + vs[3])));
  }

  static void forward_long(const Args& a, int64_t i, acc_t* sums) {
    const int64_t C = a.classes;
    const scalar_t* x = a.input + i * C;
    acc_t mx, lsum;
    row_stats_long(x, C, mx, lsum);
    const V m(mx), ls(lsum);
    save_row_stats(a.stats + kRowStats * i, mx, lsum);
    if (a.target) {
      const int64_t y = a.target[i];
      acc_t nll = 0, smooth = 0;
      if (y != a.ignore_index) {
        nll = weight(a, y) * neg_log_prob(static_cast<acc_t>(x[y]), mx, lsum);
        if (a.opts.smoothing) {
          V part(0);
          for (int64_t c0 = 0; c0 < C; c0 += L) {
            const int64_t n = std::min(L, C - c0);
            part = part + first_lanes(weights(a, c0, n) * neg_log_prob(load<acc_t>(x + c0, n), m, ls), n);
          }
          smooth = lane_sum(part);
        }
      }
      if (a.loss_rows) a.loss_rows[i] = static_cast<scalar_t>(index_row_loss(nll, smooth, a.opts));
      sums[0] += nll;
      sums[1] += smooth;
    } else {
      const scalar_t* t = a.probs + i * C;
      V part(0);
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t n = std::min(L, C - c0);
        const V wt = weights(a, c0, n) * a.opts.smoothed_target(load<acc_t>(t + c0, n));
        part = part + first_lanes(prob_loss_term(neg_log_prob(load<acc_t>(x + c0, n), m, ls), wt), n);
      }
      const acc_t row_loss = lane_sum(part);
      if (a.loss_rows) a.loss_rows[i] = static_cast<scalar_t>(row_loss);
      sums[0] += row_loss;
    }
  }

  static void backward_long(const Args& a, int64_t i) {
    const int64_t C = a.classes;
    const scalar_t* x = a.input + i * C;
    const SavedRowStats<acc_t> st(a.stats + kRowStats * i);
    const V m(st.max), ls(st.log_sum);
    if (a.target) {
      const auto s = index_scales(a, i, mean_grad(a));
      const V g(index_grad_row_scale(a.weight_total, s)), vb(s.b), va(s.a);
      const int64_t y = a.target[i] == a.ignore_index ? -1 : a.target[i];
      scalar_t* out = a.grad_input + i * C;
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t n = std::min(L, C - c0);
        V grad = index_grad_class(softmax_of(load<acc_t>(x + c0, n), m, ls), g, vb, weights(a, c0, n),
                                  a.opts.smoothing);
        if (y >= c0 && y < c0 + n) {
          grad = V::blendv(grad, grad - va, V::arange(0, 1) == V(static_cast<acc_t>(y - c0)));
        }
        store(out + c0, grad, n);
      }
      return;
    }
    const scalar_t* t = a.probs + i * C;
    const V g(prob_grad_scale(grad_of_row(a, i), a.rows, a.reduction));
    if (a.grad_input) {
      V part(0);
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t n = std::min(L, C - c0);
        part = part + first_lanes(weights(a, c0, n) * a.opts.smoothed_target(load<acc_t>(t + c0, n)), n);
      }
      const V total(lane_sum(part));
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t n = std::min(L, C - c0);
        const V wt = weights(a, c0, n) * a.opts.smoothed_target(load<acc_t>(t + c0, n));
        store(a.grad_input + i * C + c0, prob_input_grad(softmax_of(load<acc_t>(x + c0, n), m, ls), total, wt, g), n);
      }
    }
    if (a.grad_target) {
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t n = std::min(L, C - c0);
        store(a.grad_target + i * C + c0,
              prob_target_grad(neg_log_prob(load<acc_t>(x + c0, n), m, ls), weights(a, c0, n), g, a.opts), n);
      }
    }
  }

  static void forward(const Args& a, int64_t first, int64_t last, acc_t* sums) {
    sums[0] = sums[1] = acc_t(0);
    if (a.classes <= kShortRow) {
      for (int64_t r0 = first; r0 < last; r0 += L) forward_short(a, r0, std::min(L, last - r0), sums);
    } else {
      for (int64_t i = first; i < last; ++i) forward_long(a, i, sums);
    }
  }

  // forward, then backward of the same rows while they are in cache (class-index targets with short
  // rows reuse the forward's exps: p = exp(x - max) / s).
  static void forward_backward(const Args& a, int64_t first, int64_t last, acc_t* sums) {
    sums[0] = sums[1] = acc_t(0);
    if (a.classes > kShortRow) {
      for (int64_t i = first; i < last; ++i) {
        forward_long(a, i, sums);
        backward_long(a, i);
      }
      return;
    }
    for (int64_t r0 = first; r0 < last; r0 += L) {
      const int64_t n = std::min(L, last - r0);
      if (!a.target) {
        forward_short(a, r0, n, sums);
        backward_short(a, r0, n);
        continue;
      }
      const IndexRowScales rs(a, r0, n);
      Block x, e;
      x.load_rows(a.input + r0 * a.classes, n, a.classes);
      V m, s, ls;
      block_stats(x, a.classes, m, s, ls, &e);
      forward_short_terms(a, r0, n, x, m, ls, sums);
      const V inv_sum = V(1) / s;
      index_grad_short(a, r0, n, rs, [&](int64_t c) { return e.column(c) * inv_sum; });
    }
  }

  static void backward(const Args& a, int64_t first, int64_t last) {
    if (a.classes <= kShortRow) {
      for (int64_t r0 = first; r0 < last; r0 += L) backward_short(a, r0, std::min(L, last - r0));
    } else {
      for (int64_t i = first; i < last; ++i) backward_long(a, i);
    }
  }

  // -- log_softmax over the rows (fused_mlp's final layer): the same row stats as the loss --

  static void log_softmax(const scalar_t* x, scalar_t* out, int64_t rows, int64_t C) {
    if (C <= kShortRow) {
      for (int64_t r0 = 0; r0 < rows; r0 += L) {
        const int64_t n = std::min(L, rows - r0);
        Block b;
        b.load_rows(x + r0 * C, n, C);
        V m, s, ls;
        block_stats(b, C, m, s, ls);
        for (int64_t c = 0; c < C; ++c) b.set_column(c, neg_log_prob(b.column(c), m, ls).neg());
        b.store_rows(out + r0 * C, n, C);
      }
      return;
    }
    for (int64_t i = 0; i < rows; ++i) {
      acc_t mx, lsum;
      row_stats_long(x + i * C, C, mx, lsum);
      const V m(mx), ls(lsum);
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t n = std::min(L, C - c0);
        store(out + i * C + c0, neg_log_prob(load<acc_t>(x + i * C + c0, n), m, ls).neg(), n);
      }
    }
  }

  // grad_x = grad - exp(out) * sum(grad) per row, from log_softmax's output (grad_x may be grad).
  static void log_softmax_backward(const scalar_t* grad, const scalar_t* out, scalar_t* grad_x, int64_t rows,
                                   int64_t C) {
    if (C <= kShortRow) {
      for (int64_t r0 = 0; r0 < rows; r0 += L) {
        const int64_t n = std::min(L, rows - r0);
        Block g, y;
        g.load_rows(grad + r0 * C, n, C);
        y.load_rows(out + r0 * C, n, C);
        V total(0);
        for (int64_t c = 0; c < C; ++c) total = total + g.column(c);
        for (int64_t c = 0; c < C; ++c) g.set_column(c, g.column(c) - exp_nonpositive(y.column(c)) * total);
        g.store_rows(grad_x + r0 * C, n, C);
      }
      return;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* gi = grad + i * C;
      V part(0);
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t n = std::min(L, C - c0);
        part = part + first_lanes(load<acc_t>(gi + c0, n), n);
      }
      const V total(lane_sum(part));
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t n = std::min(L, C - c0);
        store(grad_x + i * C + c0,
              load<acc_t>(gi + c0, n) - exp_nonpositive(load<acc_t>(out + i * C + c0, n)) * total, n);
      }
    }
  }
};

// ---- linear_relu passes ----

template <typename scalar_t>
void bias_relu(scalar_t* out, const scalar_t* bias, int64_t rows, int64_t cols, bool with_relu) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = Vec<acc_t>::size();
  // One loop per variant, so that none tests its options per element.
  auto pass = [&](auto has_bias, auto has_relu) {
    for (int64_t i = 0; i < rows; ++i) {
      scalar_t* row = out + i * cols;
      for (int64_t j = 0; j < cols; j += L) {
        const int64_t n = std::min(L, cols - j);
        Vec<acc_t> v = load<acc_t>(row + j, n);
        if constexpr (decltype(has_bias)::value) v = v + load<acc_t>(bias + j, n);
        if constexpr (decltype(has_relu)::value) v = relu(v);
        store(row + j, v, n);
      }
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (bias && with_relu) pass(yes(), yes());
  else if (bias) pass(yes(), no());
  else if (with_relu) pass(no(), yes());
}

template <typename scalar_t>
void mask_grad(const MaskGradArgs<scalar_t>& a, int64_t c0, int64_t width, at::opmath_type<scalar_t>* column_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = Vec<acc_t>::size();
  constexpr int64_t kChunks = (kMaskColumns + L - 1) / L;
  Vec<acc_t> acc[kChunks];
  for (auto& v : acc) v = Vec<acc_t>(0);
  alignas(64) scalar_t strided[L];
  for (int64_t i = 0; i < a.rows; ++i) {
    const scalar_t* g = a.grad + i * a.grad_row_stride + c0 * a.grad_col_stride;
    const scalar_t* y = a.output + i * a.cols + c0;
    scalar_t* p = a.grad_pre + i * a.cols + c0;
    for (int64_t k = 0, j = 0; j < width; ++k, j += L) {
      const int64_t n = std::min(L, width - j);
      const scalar_t* gj = g + j * a.grad_col_stride;
      if (a.grad_col_stride != 1) {  // e.g. the stride-0 grad of out.sum().backward()
        for (int64_t e = 0; e < n; ++e) strided[e] = gj[e * a.grad_col_stride];
        gj = strided;
      }
      const Vec<acc_t> v = relu_grad(load<acc_t>(gj, n), load<acc_t>(y + j, n));
      store(p + j, v, n);
      acc[k] = acc[k] + first_lanes(v, n);
    }
  }
  if (!column_sums) return;
  for (int64_t k = 0, j = 0; j < width; ++k, j += L) {
    alignas(64) acc_t b[L];
    acc[k].store(b);
    for (int64_t e = 0; e < std::min(L, width - j); ++e) column_sums[j + e] = b[e];
  }
}

// ---- SGD ----
//
// One pass per variant (the options fixed for the whole pass are template arguments), with
// row_math's formulas: torch.optim.SGD's roundings.

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Denormals (float). Momentum buffers of units that stopped learning (a dead ReLU: its gradient is
// exactly 0) decay by `momentum` each step into denormals, and then stay at the smallest one
// (0.9 * 2^-149 rounds back up). With IEEE denormals, PyTorch's default, each vector instruction that meets one
// takes a microcode assist of hundreds of cycles: on one core at batch 64, the ~2400 such entries of
// MNIST's first layer after three epochs made a train step 325 us instead of 245 with denormals
// flushed (an epoch: within ~1% either way with what follows). In those lanes the pass computes
// the same bits without float arithmetic on a denormal:
//   buf' = buf * momentum + g with g = +-0 and buf = s * k * 2^-149 (k < 2^23, its magnitude bits):
//          s * round(k * momentum) * 2^-149, the product rounded to an integer from its exact value;
//   param' = param - lr * d = param when |buf'| < 2^-100 (with Nesterov, g = +-0 too, so that
//          |d| <= |buf'|), |param| >= 2^-60 and lr < 2^15 (the product is below a quarter of
//          param's ulp), so the float path gets d = 0 there.
// It does so when momentum is in [2^-60, 1], 1 - dampening > 0 and denormals are IEEE on this thread
// (MXCSR without FTZ/DAZ, which torch.set_flush_denormal sets).
using Bits = at::vec::Vectorized<int32_t>;

C10_ALWAYS_INLINE Bits bits_of(const Vec<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(v);
#else
  return _mm256_castps_si256(v);
#endif
}

C10_ALWAYS_INLINE Vec<float> float_of(const Bits& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(b);
#else
  return _mm256_castsi256_ps(b);
#endif
}

// All bits set in the lanes whose magnitude is below that of the float with bits `limit` (integer
// compares: no float instruction sees a denormal).
C10_ALWAYS_INLINE Bits magnitude_below(const Bits& bits, int32_t limit) {
  return (bits & Bits(0x7fffffff)) < Bits(limit);
}

C10_ALWAYS_INLINE bool any_lane(const Bits& mask) {
  return float_of(mask).zero_mask() != (1 << Bits::size()) - 1;  // a set lane reads as a NaN, not 0
}

constexpr int32_t kFloatMinBits = 0x00800000;    // 2^-126, the smallest normal float
constexpr int32_t kTinyBits = 0x0d800000;  // 2^-100
constexpr int32_t kSafeParamBits = 0x21800000;   // 2^-60

// Denormals are IEEE on this thread: MXCSR has neither FTZ nor DAZ (torch.set_flush_denormal sets both).
inline bool ieee_denormals() { return (_mm_getcsr() & 0x8040) == 0; }

inline bool exact_denormals(const SgdOptions<float>& o) {
  return o.momentum >= 0x1p-60f && o.momentum <= 1.0f && o.one_minus_dampening > 0.0f && o.lr >= 0.0f &&
         o.lr < 0x1p15f && ieee_denormals();
}

// The magnitude bits k of a float (an integer below 2^31, so exact as a normal float) and k * mu =
// hi + lo exactly (lo: the FMA's rounding error), for mu >= 2^-60.
struct ExactProduct {
  Vec<float> k, hi, lo;
};

C10_ALWAYS_INLINE ExactProduct magnitude_times(const Bits& bits, const Vec<float>& mu) {
  const Vec<float> k = at::vec::convert_to_fp_of_same_size<float>(bits & Bits(0x7fffffff));
  const Vec<float> hi = k * mu;
  return {k, hi, at::vec::fmadd(k, mu, Vec<float>(0) - hi)};
}

// hi + lo rounded to the nearest integer, ties to even: rounding hi is right unless hi is a tie,
// which lo breaks.
C10_ALWAYS_INLINE Vec<float> nearest_integer(const ExactProduct& x) {
  using V = Vec<float>;
  const V below = x.hi.floor();
  const V tie = (x.hi - below == V(0.5f)) & (x.lo != V(0));
  return V::blendv(x.hi.round(), V::blendv(below, below + V(1), x.lo > V(0)), tie);
}

// buf * momentum + g for denormal buf and g = +-0: s * round(k * momentum) * 2^-149.
C10_ALWAYS_INLINE Vec<float> decayed_denormal(const Bits& buf_bits, const Bits& g_bits, const Vec<float>& momentum) {
  const Bits sign = buf_bits & Bits(INT32_MIN);
  const Bits magnitude = at::vec::convert_to_int_of_same_size<float>(nearest_integer(magnitude_times(buf_bits, momentum)));
  // a product rounded to 0 plus +-0: -0 only when both are (round to nearest)
  return float_of(Bits::blendv(sign | magnitude, sign & g_bits, magnitude == Bits(0)));
}

// The shortcuts above for a vector with a buffer below 2^-100 in some lane: sets buf' and the
// direction param moves along and returns true, or returns false (no such lane: the plain
// formulas). Lanes the shortcuts do not cover take the plain formulas here too (exact, only slower).
template <bool kNesterov>
C10_ALWAYS_INLINE bool tiny_buffer_update(const Vec<float>& bk, const Vec<float>& gk, const Vec<float>& pk,
                                          const SgdOptions<float>& o, Vec<float>& b, Vec<float>& d) {
  using V = Vec<float>;
  const Bits b_bits = bits_of(bk);
  if (!any_lane(magnitude_below(b_bits, kTinyBits))) return false;
  const Bits g_bits = bits_of(gk), zero_grad = magnitude_below(g_bits, 1);
  const V denormal = float_of(magnitude_below(b_bits, kFloatMinBits) & ~magnitude_below(b_bits, 1) & zero_grad);
  b = V::blendv(sgd_momentum_buffer(V::blendv(bk, V(0), denormal), gk, o),
                decayed_denormal(b_bits, g_bits, V(o.momentum)), denormal);
  Bits unchanged = magnitude_below(bits_of(b), kTinyBits) & ~magnitude_below(bits_of(pk), kSafeParamBits);
  if constexpr (kNesterov) unchanged = unchanged & zero_grad;  // so that |d| <= |buf'|
  const V keep = float_of(unchanged);
  d = V::blendv(sgd_direction(gk, V::blendv(b, V(0), keep), o), V(0), keep);
  return true;
}
#endif

template <typename scalar_t, bool kDecay, bool kMomentum, bool kFirst, bool kNesterov>
void sgd_pass(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf, int64_t n,
              const SgdOptions<at::opmath_type<scalar_t>>& options) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  SgdOptions<acc_t> o = options;
  o.first_step = kFirst;
  o.nesterov = kNesterov;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr bool kShortcuts = std::is_same_v<scalar_t, float> && kMomentum && !kFirst;
  bool shortcuts = false;
  if constexpr (kShortcuts) shortcuts = exact_denormals(o);
#endif
  for (int64_t k = 0; k < n; k += L) {
    const int64_t m = std::min(L, n - k);
    const V pk = load<acc_t>(p + k, m);
    const V gk = kDecay ? sgd_decayed_grad(load<acc_t>(g + k, m), pk, o) : load<acc_t>(g + k, m);
    V d = gk;
    if constexpr (kMomentum) {
      const V bk = kFirst ? V(0) : load<acc_t>(buf + k, m);
      V b;
      bool done = false;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      // one compare per vector on the common path
      if constexpr (kShortcuts) done = shortcuts && tiny_buffer_update<kNesterov>(bk, gk, pk, o, b, d);
#endif
      if (!done) {
        b = sgd_momentum_buffer(bk, gk, o);
        d = sgd_direction(gk, b, o);
      }
      store(buf + k, b, m);
    }
    store(p + k, sgd_param(pk, d, o), m);
  }
}

template <typename scalar_t>
void sgd(scalar_t* p, const scalar_t* g, scalar_t* buf, int64_t n, const SgdOptions<at::opmath_type<scalar_t>>& o) {
  // The options fixed for the whole pass are template arguments: each variant is a branch-free loop.
  auto run = [&](auto decay) {
    constexpr bool kDecay = decltype(decay)::value;
    if (!buf) {
      sgd_pass<scalar_t, kDecay, false, false, false>(p, g, buf, n, o);
    } else if (o.first_step) {
      if (o.nesterov) sgd_pass<scalar_t, kDecay, true, true, true>(p, g, buf, n, o);
      else sgd_pass<scalar_t, kDecay, true, true, false>(p, g, buf, n, o);
    } else {
      if (o.nesterov) sgd_pass<scalar_t, kDecay, true, false, true>(p, g, buf, n, o);
      else sgd_pass<scalar_t, kDecay, true, false, false>(p, g, buf, n, o);
    }
  };
  if (o.weight_decay != 0) run(std::true_type());
  else run(std::false_type());
}

// ---- Adam ----
//
// One pass per variant, with row_math's formulas: torch.optim.Adam's roundings.

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The intrinsic register type under a Vectorized<float / double>.
template <typename V>
struct Register;
#if defined(CPU_CAPABILITY_AVX512)
template <>
struct Register<Vec<float>> { using type = __m512; };
template <>
struct Register<Vec<double>> { using type = __m512d; };
#else
template <>
struct Register<Vec<float>> { using type = __m256; };
template <>
struct Register<Vec<double>> { using type = __m256d; };
#endif
#endif

// A value as torch stores it in a tensor of scalar_t: bfloat16 and float16 round; float and double
// are already rounded, but g++ (-ffp-contract=fast, its default) would fuse a product stored this
// way into the add that follows it, one rounding fewer than torch's separate ops: an empty asm
// that takes and gives the register keeps the product a value of its own.
template <typename scalar_t>
struct StoredAs {
  template <typename V>
  C10_ALWAYS_INLINE V operator()(const V& v) const {
    if constexpr (std::is_same_v<scalar_t, typename V::value_type>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      auto reg = v.operator typename Register<V>::type();
      asm("" : "+v"(reg));
      return V(reg);
#else
      return v;  // no FMA instructions in the baseline build: nothing to fuse
#endif
    } else {
      return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(v, v)));
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Denormals (float), as for SGD above, only worse: Adam's exp_avg of a unit that stopped learning
// (gradient exactly 0) decays by 1 - (1 - beta1) each step, reaches the denormals within about
// 800 steps and stays at the smallest one, and every lane of it costs assists in the lerp, the
// update's product and quotient. On one core, Adam at lr 1e-3 left 40% of MNIST's first-layer
// exp_avg denormal after two epochs (51 dead units), and an epoch took 5.5 s instead of 0.66 s
// with denormals flushed. In a lane with g = +-0, |exp_avg| < 2^-100, exp_avg_sq >= +0 (not NaN)
// and 2^-40 <= |param| < inf the pass computes the same bits without float arithmetic on a denormal:
//   exp_avg'    = exp_avg.lerp(0, w) = s * round(k * (1 - w)) * 2^-149 for a denormal exp_avg
//                 (both of lerp's formulas are one rounding of k - k * w, k its magnitude bits);
//   exp_avg_sq' = exp_avg_sq * beta2 + 0 = round(k * beta2) * 2^-149 for a denormal exp_avg_sq;
//   param'      = param: |-step_size * exp_avg' / denom| <= step_size * 2^-100 / eps <= 2^-70 when
//                 step_size <= 2^30 * eps, below a quarter of param's ulp (so the float path gets
//                 exp_avg' = 0 and exp_avg_sq' = 1 there, and no denormal).
// It does so when 1 - beta1 and beta2 are in [2^-60, 1), eps > 0, step_size <= 2^30 * eps and
// denormals are IEEE on this thread. Other lanes take the float formulas (exact, only slower).
constexpr int32_t kSafeAdamParamBits = 0x2b800000;  // 2^-40
constexpr int32_t kInfBits = 0x7f800000;

inline bool exact_denormals(const AdamOptions<float>& o) {
  return o.lerp_weight >= 0x1p-60f && o.lerp_weight < 1.0f && o.beta2 >= 0x1p-60f && o.beta2 < 1.0f &&
         o.eps > 0.0f && -o.neg_step_size <= o.eps * 0x1p30f && ieee_denormals();
}

// exp_avg.lerp(+-0, w) for denormal exp_avg: k - k * w with k * w = hi + lo rounds to
// k - round(k * w), except where k * w is itself a half-integer (an exact tie): k - k * w is one
// too, and rounds to the even one of its neighbours. The exact value is not 0: its sign is exp_avg's.
C10_ALWAYS_INLINE Vec<float> lerped_denormal(const Bits& m_bits, const Vec<float>& w) {
  using V = Vec<float>;
  const ExactProduct x = magnitude_times(m_bits, w);
  const V below = x.hi.floor();
  const V upper = x.k - below;  // k - k * w + 1/2 at a tie
  const V half = upper * V(0.5f);
  const V even = V::blendv(upper - V(1), upper, half.floor() == half);
  const V tie = (x.hi - below == V(0.5f)) & (x.lo == V(0));
  const V kept = V::blendv(x.k - nearest_integer(x), even, tie);
  return float_of((m_bits & Bits(INT32_MIN)) | at::vec::convert_to_int_of_same_size<float>(kept));
}

// The shortcuts above for a vector with |exp_avg| < 2^-100 in some lane: sets the new exp_avg and
// exp_avg_sq, and the exp_avg and exp_avg_sq the parameter's update reads (0 and 1 in the lanes it
// leaves unchanged), and returns true; or returns false (no such lane: the plain formulas).
C10_ALWAYS_INLINE bool tiny_exp_avg_update(const Vec<float>& pk, const Vec<float>& gk, const Vec<float>& mk,
                                           const Vec<float>& vk, const AdamOptions<float>& o, Vec<float>& m_new,
                                           Vec<float>& v_new, Vec<float>& m_step, Vec<float>& v_step) {
  using V = Vec<float>;
  const Bits m_bits = bits_of(mk);
  const Bits tiny = magnitude_below(m_bits, kTinyBits);
  if (!any_lane(tiny)) return false;
  const Bits v_bits = bits_of(vk), p_bits = bits_of(pk);
  const Bits dead = tiny & magnitude_below(bits_of(gk), 1) & ~magnitude_below(p_bits, kSafeAdamParamBits) &
                    magnitude_below(p_bits, kInfBits) & (v_bits > Bits(-1)) & (v_bits <= Bits(kInfBits));
  const V denormal_m = float_of(dead & magnitude_below(m_bits, kFloatMinBits) & ~magnitude_below(m_bits, 1));
  const V denormal_v = float_of(dead & (v_bits < Bits(kFloatMinBits)) & (v_bits > Bits(0)));
  const V keep = float_of(dead);
  m_new = V::blendv(adam_exp_avg(V::blendv(mk, V(0), denormal_m), gk, o), lerped_denormal(m_bits, V(o.lerp_weight)),
                    denormal_m);
  v_new = V::blendv(adam_exp_avg_sq(V::blendv(vk, V(0), denormal_v), gk, o, StoredAs<float>()),
                    decayed_denormal(v_bits, Bits(0), V(o.beta2)), denormal_v);
  m_step = V::blendv(m_new, V(0), keep);
  v_step = V::blendv(v_new, V(1), keep);  // any positive root will do; VML's sqrt of 0 is ~20x slower than of 1
  return true;
}
#endif

// In blocks that stay in L1: the moments first, then torch's sqrt of every exp_avg_sq of the block
// at once (MKL's VML, as torch.sqrt, for float and double), then the parameters.
template <typename scalar_t, bool kGradDecay, bool kParamDecay>
void adam_pass(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
               scalar_t* __restrict__ v, int64_t n, const AdamOptions<at::opmath_type<scalar_t>>& o) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size(), kBlock = 1024;
  const StoredAs<scalar_t> stored;
  alignas(64) acc_t root[kBlock];    // the exp_avg_sq the update reads, then its square root
  alignas(64) acc_t m_step[kBlock];  // the exp_avg the update reads
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr bool kShortcuts = std::is_same_v<scalar_t, float>;
  bool shortcuts = false;
  if constexpr (kShortcuts) shortcuts = exact_denormals(o);
#endif
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t nb = std::min(kBlock, n - b);
    scalar_t* pb = p + b;
    for (int64_t k = 0; k < nb; k += L) {
      const int64_t c = std::min(L, nb - k);
      V pk = load<acc_t>(pb + k, c), gk = load<acc_t>(g + b + k, c);
      if constexpr (kGradDecay) gk = stored(fmadd(pk, V(o.weight_decay), gk));  // grad.add(param, alpha=wd)
      if constexpr (kParamDecay) {
        pk = stored(pk * V(o.decay_factor));  // param.mul_(1 - lr * wd)
        store(pb + k, pk, c);
      }
      const V mk = load<acc_t>(m + b + k, c), vk = load<acc_t>(v + b + k, c);
      V m_new, v_new, mu, nu;
      bool done = false;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      // one compare per vector on the common path
      if constexpr (kShortcuts) done = shortcuts && tiny_exp_avg_update(pk, gk, mk, vk, o, m_new, v_new, mu, nu);
#endif
      if (!done) {
        m_new = mu = stored(adam_exp_avg(mk, gk, o));
        v_new = nu = stored(adam_exp_avg_sq(vk, gk, o, stored));
      }
      store(m + b + k, m_new, c);
      store(v + b + k, v_new, c);
      mu.store(m_step + k, c);
      nu.store(root + k, c);
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      torch_sqrt(root, nb);
    } else {  // torch's bfloat16 / float16 sqrt: the float root, stored
      for (int64_t k = 0; k < nb; k += L) {
        const int64_t c = std::min(L, nb - k);
        stored(V::loadu(root + k, c).sqrt()).store(root + k, c);
      }
    }
    for (int64_t k = 0; k < nb; k += L) {
      const int64_t c = std::min(L, nb - k);
      const V denom = adam_denom(V::loadu(root + k, c), o, stored);
      store(pb + k, adam_param(load<acc_t>(pb + k, c), V::loadu(m_step + k, c), denom, o), c);
    }
  }
}

template <typename scalar_t>
void adam(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, int64_t n,
          const AdamOptions<at::opmath_type<scalar_t>>& o) {
  if (o.grad_decay) adam_pass<scalar_t, true, false>(p, g, m, v, n, o);
  else if (o.param_decay) adam_pass<scalar_t, false, true>(p, g, m, v, n, o);
  else adam_pass<scalar_t, false, false>(p, g, m, v, n, o);
}

// ---- byte lookup: dst[i] = table[src[i]] (uint8 images through a 256-entry pixel map) ----

template <typename scalar_t>
void map_bytes(scalar_t* dst, const uint8_t* src, int64_t n, const scalar_t* table) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {  // a hardware gather from the table (1 KB: in L1)
#if defined(CPU_CAPABILITY_AVX512)
    for (; i + 16 <= n; i += 16) {
      const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm512_storeu_ps(dst + i, _mm512_i32gather_ps(index, table, sizeof(float)));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    for (; i + 8 <= n; i += 8) {
      const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_i32gather_ps(table, index, sizeof(float)));
    }
#endif
  }
  for (; i < n; ++i) dst[i] = table[src[i]];
}

template <typename scalar_t>
Kernels<scalar_t> make_kernels() {
  return {&CrossEntropyKernels<scalar_t>::forward, &CrossEntropyKernels<scalar_t>::backward,
          &CrossEntropyKernels<scalar_t>::forward_backward, &CrossEntropyKernels<scalar_t>::log_softmax,
          &CrossEntropyKernels<scalar_t>::log_softmax_backward, &bias_relu<scalar_t>, &mask_grad<scalar_t>,
          &sgd<scalar_t>, &adam<scalar_t>, &map_bytes<scalar_t>};
}

const KernelTable& table() {
  static const KernelTable t{MNIST_FAST_CAPABILITY_NAME, make_kernels<float>(), make_kernels<double>(),
                             make_kernels<c10::BFloat16>(), make_kernels<c10::Half>()};
  return t;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace mnist_fast
