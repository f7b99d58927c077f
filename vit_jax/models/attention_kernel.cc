// Multi-head self-attention for XLA:CPU, called through jax.ffi.
//
// Why: XLA:CPU runs the attention's batched small products (batch * heads
// products of tokens x head_dim) at 15-20% of its large-matmul rate, and
// they are most of the attention's time (docs/performance.md). Here each
// (example, head) is one task whose operands stay in the L1/L2 cache: the
// two products, the softmax in between and, for the gradient, the five
// backward products.
//
// Layouts (row-major):
//   qkv      (batch, tokens, 3, heads, head_dim)  the fused Q/K/V projection,
//            read in place; the query is already scaled by 1/sqrt(head_dim).
//   out      (batch, tokens, heads, head_dim)     softmax(q k^T) v
//   weights  (batch, heads, tokens, padded)       softmax(q k^T), its rows
//            padded with zeros to whole vectors (`padded` columns)
// head_dim must be a multiple of 16 (checked by the Python wrapper and here).
// Compiled on the machine that runs it (-march=native) by attention_kernel.py.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows of the weights are padded, and head_dim must be a multiple of, this
// many floats, whatever the CPU: the Python wrapper allocates by it.
constexpr int64_t kAlign = 16;

// Vectors as wide as the CPU's registers: 16 floats with AVX-512, else 8
// (AVX2). Wider GCC vectors than the registers are split inefficiently.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
static_assert(kAlign % kLanes == 0, "padding must hold whole vectors");
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// Every lane x, spelled out: GCC makes one broadcast of this, but keeps
// `Vec{} + x` as a scalar add first and builds a loop's lanes one by one,
// in the innermost loop of Tile.
inline Vec Splat(float x) {
#if defined(__AVX512F__)
  return Vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
  return Vec{x, x, x, x, x, x, x, x};
#endif
}

inline int64_t RoundUpToAlign(int64_t n) {
  return (n + kAlign - 1) / kAlign * kAlign;
}

// exp(x) for x <= 0 (softmax after subtracting the row maximum): 2^n * e^r
// with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its degree-6 Taylor
// polynomial (relative error < 2e-7). Inputs below -87 give ~1e-38, not 0.
inline Vec Exp(Vec x) {
  const Vec lowest = Splat(-87.0f);
  x = x < lowest ? lowest : x;
  const Vec round_magic = Splat(12582912.0f);  // 1.5 * 2^23
  Vec shifted = x * 1.44269504088896341f + round_magic;
  Vec n = shifted - round_magic;
  Vec r = x - n * 0.693359375f;  // ln 2 in two parts, exact product first
  r = r - n * -2.12194440e-4f;
  Vec poly = Splat(1.0f / 720);
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  IVec exponent = (__builtin_bit_cast(IVec, shifted) - 0x4B400000 + 127) << 23;
  return poly * __builtin_bit_cast(Vec, exponent);
}

inline Vec Max(Vec x, Vec y) { return x > y ? x : y; }

// Folds the lanes pairwise (log2(lanes) shuffles, not lanes - 1 dependent
// scalar ops) and returns the result in every lane.
template <typename Combine>
inline Vec AcrossLanes(Vec v, Combine combine) {
#if defined(__AVX512F__)
  v = combine(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15,
                                         0, 1, 2, 3, 4, 5, 6, 7));
  v = combine(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13,
                                         14, 15, 8, 9, 10, 11));
  v = combine(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11,
                                         8, 9, 14, 15, 12, 13));
  return combine(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9,
                                            8, 11, 10, 13, 12, 15, 14));
#else
  v = combine(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = combine(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  return combine(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
#endif
}

inline Vec SumAcrossLanes(Vec v) {
  return AcrossLanes(v, [](Vec x, Vec y) { return x + y; });
}

inline Vec MaxAcrossLanes(Vec v) { return AcrossLanes(v, Max); }

// A matrix operand read one element at a time: element (i, k) is at
// data[i * row_stride + k * depth_stride], so a transposed operand needs no
// copy.
struct Strided {
  const float* data;
  int64_t row_stride, depth_stride;
  Strided Rows(int64_t first) const {
    return Strided{data + first * row_stride, row_stride, depth_stride};
  }
};

// C[r, :width] = sum_k A[r, k] * B[k, :width] for kRows rows of A, where
// width = kLanes * kVectors: the register-blocked inner loop of Matmul.
template <int kRows, int kVectors>
void Tile(Strided a, const float* b, int64_t ldb, int64_t depth, float* c,
          int64_t ldc) {
  Vec acc[kRows][kVectors] = {};
  for (int64_t k = 0; k < depth; ++k) {
    Vec row[kVectors];
    for (int v = 0; v < kVectors; ++v) row[v] = Load(b + k * ldb + v * kLanes);
    const float* column = a.data + k * a.depth_stride;
    for (int r = 0; r < kRows; ++r) {
      Vec x = Splat(column[r * a.row_stride]);
      for (int v = 0; v < kVectors; ++v) acc[r][v] += x * row[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v)
      Store(c + r * ldc + v * kLanes, acc[r][v]);
}

// Tiles of kVectors columns over all `rows` rows: as many rows at a time as
// the registers hold (accumulators plus one B row). With AVX-512's 32
// registers GCC keeps 5 x 5 accumulators in registers; with 4 x 5 it reads B
// from memory in every multiply-add and runs at half the speed. With AVX2's
// 16 registers of 8 floats, 6 rows x 2 vectors (12 registers) is the largest.
template <int kVectors>
void ColumnBlock(int64_t rows, Strided a, const float* b, int64_t ldb,
                 int64_t depth, float* c, int64_t ldc) {
  constexpr int kRows = kVectors >= 5 ? 5 : 6;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    Tile<kRows, kVectors>(a.Rows(r), b, ldb, depth, c + r * ldc, ldc);
  Strided a_rest = a.Rows(r);
  float* c_rest = c + r * ldc;
  switch (rows - r) {
    case 5: Tile<5, kVectors>(a_rest, b, ldb, depth, c_rest, ldc); break;
    case 4: Tile<4, kVectors>(a_rest, b, ldb, depth, c_rest, ldc); break;
    case 3: Tile<3, kVectors>(a_rest, b, ldb, depth, c_rest, ldc); break;
    case 2: Tile<2, kVectors>(a_rest, b, ldb, depth, c_rest, ldc); break;
    case 1: Tile<1, kVectors>(a_rest, b, ldb, depth, c_rest, ldc); break;
    default: break;
  }
}

// How many of the `vectors` remaining columns the next column block takes.
inline int64_t TileVectors(int64_t vectors) {
#if defined(__AVX512F__)
  return vectors == 5 ? 5 : std::min<int64_t>(vectors, 4);
#else
  return std::min<int64_t>(vectors, 2);
#endif
}

// C (rows x width) = A (rows x depth) @ B (depth x width), width a multiple
// of kLanes; every operand has its own strides, so Q, K, V and the
// gradients are read and written in place inside the fused layouts.
void Matmul(int64_t rows, int64_t width, int64_t depth, Strided a,
            const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t vectors = width / kLanes;
  while (vectors > 0) {
    int64_t take = TileVectors(vectors);
    switch (take) {
      case 5: ColumnBlock<5>(rows, a, b, ldb, depth, c, ldc); break;
      case 4: ColumnBlock<4>(rows, a, b, ldb, depth, c, ldc); break;
      case 3: ColumnBlock<3>(rows, a, b, ldb, depth, c, ldc); break;
      case 2: ColumnBlock<2>(rows, a, b, ldb, depth, c, ldc); break;
      default: ColumnBlock<1>(rows, a, b, ldb, depth, c, ldc); break;
    }
    b += take * kLanes;
    c += take * kLanes;
    vectors -= take;
  }
}

// dst (cols x ld_dst) = src^T for src (rows x cols); dst's columns from
// `rows` to ld_dst are zeroed, so they can be multiplied as padding.
void TransposeInto(const float* src, int64_t rows, int64_t cols,
                   int64_t ld_src, float* dst, int64_t ld_dst) {
  for (int64_t j = 0; j < cols; ++j) {
    float* out = dst + j * ld_dst;
    for (int64_t i = 0; i < rows; ++i) out[i] = src[i * ld_src + j];
    std::fill(out + rows, out + ld_dst, 0.0f);
  }
}

struct Shape {
  int64_t batch, tokens, heads, head_dim;
  int64_t padded;  // tokens rounded up to whole vectors
  int64_t qkv_row() const { return 3 * heads * head_dim; }
  int64_t out_row() const { return heads * head_dim; }
  int64_t tasks() const { return batch * heads; }
};

// Where one (example, head) task reads and writes.
struct Slices {
  int64_t example, head;
  // part 0, 1, 2: this head's Q, K or V (or their gradients).
  template <typename T>
  T* Qkv(T* base, const Shape& s, int part) const {
    return base + example * s.tokens * s.qkv_row() +
           (part * s.heads + head) * s.head_dim;
  }
  int64_t Out(const Shape& s) const {
    return example * s.tokens * s.out_row() + head * s.head_dim;
  }
  int64_t Weights(const Shape& s) const {
    return (example * s.heads + head) * s.tokens * s.padded;
  }
};

Slices SlicesOf(const Shape& s, int64_t task) {
  return Slices{task / s.heads, task % s.heads};
}

// Runs body(task, scratch) for every task on the calling thread and, when
// XLA's intra-op pool has idle threads, on those too. The caller only
// waits for tasks a helper has claimed, so a busy pool cannot stall it, and
// a helper that starts late finds no work and touches nothing but `state`.
template <typename Body>
void ForEachTask(ffi::ThreadPool& pool, int64_t tasks, int64_t scratch_floats,
                 const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, tasks, scratch_floats, &body]() {
    std::vector<float> scratch;
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks;) {
      if (scratch.empty()) scratch.resize(scratch_floats);
      body(t, scratch.data());
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < tasks)
    std::this_thread::yield();
}

#if defined(__AVX512F__)
const IVec kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
const IVec kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7};
#endif

// Which lanes of the vector at column `first` lie within `tokens` columns
// (a select mask, not stores: scalar stores followed by a vector load of the
// same bytes stall the CPU's store forwarding).
inline IVec InRow(int64_t first, int64_t tokens) {
  return kLaneIndex < static_cast<int32_t>(tokens - first);
}

// One row of logits -> softmax in place; columns past `tokens` end as 0.
void SoftmaxRow(float* row, int64_t tokens, int64_t padded) {
  const Vec lowest = Splat(-1e30f);
  Vec best = lowest;
  for (int64_t j = 0; j < padded; j += kLanes)
    best = Max(best, InRow(j, tokens) ? Load(row + j) : lowest);
  Vec shift = MaxAcrossLanes(best);
  Vec total = {};
  for (int64_t j = 0; j < padded; j += kLanes) {
    Vec e = InRow(j, tokens) ? Exp(Load(row + j) - shift) : Vec{};
    Store(row + j, e);
    total += e;
  }
  Vec scale = 1.0f / SumAcrossLanes(total);
  for (int64_t j = 0; j < padded; j += kLanes)
    Store(row + j, Load(row + j) * scale);
}

// A row-major (rows x cols) block with row stride `ld`, as a matrix operand
// or, transposed, as the operand of a product with its transpose.
Strided Plain(const float* data, int64_t ld) { return Strided{data, ld, 1}; }
Strided Transposed(const float* data, int64_t ld) {
  return Strided{data, 1, ld};
}

void ForwardTask(const Shape& s, const float* qkv, float* out, float* weights,
                 int64_t task, float* scratch) {
  Slices at = SlicesOf(s, task);
  const int64_t n = s.tokens, p = s.padded, d = s.head_dim;
  const int64_t row = s.qkv_row();
  float* key_t = scratch;  // head_dim x padded
  float* probs = weights + at.Weights(s);
  TransposeInto(at.Qkv(qkv, s, 1), n, d, row, key_t, p);
  Matmul(n, p, d, Plain(at.Qkv(qkv, s, 0), row), key_t, p, probs, p);
  for (int64_t i = 0; i < n; ++i) SoftmaxRow(probs + i * p, n, p);
  Matmul(n, d, n, Plain(probs, p), at.Qkv(qkv, s, 2), row, out + at.Out(s),
         s.out_row());
}

// Gradient of one (example, head); `weights_grad` may be null.
void BackwardTask(const Shape& s, const float* qkv, const float* weights,
                  const float* out_grad, const float* weights_grad,
                  float* qkv_grad, int64_t task, float* scratch) {
  Slices at = SlicesOf(s, task);
  const int64_t n = s.tokens, p = s.padded, d = s.head_dim;
  const int64_t row = s.qkv_row();
  float* value_t = scratch;              // head_dim x padded
  float* logits_grad = value_t + d * p;  // tokens x padded: dP, then dS
  const float* probs = weights + at.Weights(s);
  const float* dout = out_grad + at.Out(s);

  // dV = P^T dO
  Matmul(n, d, n, Transposed(probs, p), dout, s.out_row(),
         at.Qkv(qkv_grad, s, 2), row);
  // dP = dO V^T (+ the weights' own cotangent)
  TransposeInto(at.Qkv(qkv, s, 2), n, d, row, value_t, p);
  Matmul(n, p, d, Plain(dout, s.out_row()), value_t, p, logits_grad, p);
  // dS = P * (dP - sum_j P dP), row by row; P is 0 past `tokens`, so is dS.
  for (int64_t i = 0; i < n; ++i) {
    float* g = logits_grad + i * p;
    const float* prob = probs + i * p;
    if (weights_grad != nullptr) {
      const float* extra = weights_grad + at.Weights(s) + i * p;
      for (int64_t j = 0; j < p; j += kLanes)
        Store(g + j, Load(g + j) + Load(extra + j));
    }
    Vec dot = {};
    for (int64_t j = 0; j < p; j += kLanes) dot += Load(prob + j) * Load(g + j);
    Vec centre = SumAcrossLanes(dot);
    for (int64_t j = 0; j < p; j += kLanes)
      Store(g + j, Load(prob + j) * (Load(g + j) - centre));
  }
  // dQ = dS K, dK = dS^T Q
  Matmul(n, d, n, Plain(logits_grad, p), at.Qkv(qkv, s, 1), row,
         at.Qkv(qkv_grad, s, 0), row);
  Matmul(n, d, n, Transposed(logits_grad, p), at.Qkv(qkv, s, 0), row,
         at.Qkv(qkv_grad, s, 1), row);
}

ffi::Error ShapeOf(const ffi::Buffer<ffi::F32>& qkv, Shape* shape) {
  auto dims = qkv.dimensions();
  if (dims.size() != 5 || dims[2] != 3)
    return ffi::Error::InvalidArgument(
        "vit_jax attention kernel: qkv must be (batch, tokens, 3, heads, "
        "head_dim)");
  if (dims[4] % kAlign != 0)
    return ffi::Error::InvalidArgument(
        "vit_jax attention kernel: head_dim must be a multiple of 16");
  *shape = Shape{dims[0], dims[1], dims[3], dims[4], RoundUpToAlign(dims[1])};
  return ffi::Error::Success();
}

// The weights (and their gradient) must be (batch, heads, tokens, padded).
ffi::Error CheckWeights(const ffi::Buffer<ffi::F32>& weights, const Shape& s) {
  auto dims = weights.dimensions();
  if (dims.size() != 4 || dims[0] != s.batch || dims[1] != s.heads ||
      dims[2] != s.tokens || dims[3] != s.padded)
    return ffi::Error::InvalidArgument(
        "vit_jax attention kernel: weights must be (batch, heads, tokens, "
        "tokens rounded up to a multiple of 16)");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                   ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> weights) {
  Shape s;
  if (ffi::Error error = ShapeOf(qkv, &s); error.failure()) return error;
  const float* in = qkv.typed_data();
  float* o = out->typed_data();
  float* w = weights->typed_data();
  int64_t scratch = s.head_dim * s.padded;
  ForEachTask(pool, s.tasks(), scratch, [&](int64_t task, float* buffer) {
    ForwardTask(s, in, o, w, task, buffer);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                    ffi::Buffer<ffi::F32> weights,
                    ffi::Buffer<ffi::F32> out_grad,
                    const float* weights_grad,
                    ffi::ResultBuffer<ffi::F32> qkv_grad) {
  Shape s;
  if (ffi::Error error = ShapeOf(qkv, &s); error.failure()) return error;
  if (ffi::Error error = CheckWeights(weights, s); error.failure())
    return error;
  const float* in = qkv.typed_data();
  const float* w = weights.typed_data();
  const float* dout = out_grad.typed_data();
  float* dqkv = qkv_grad->typed_data();
  int64_t scratch = (s.tokens + s.head_dim) * s.padded;
  ForEachTask(pool, s.tasks(), scratch, [&](int64_t task, float* buffer) {
    BackwardTask(s, in, w, dout, weights_grad, dqkv, task, buffer);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardFromOutput(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                              ffi::Buffer<ffi::F32> weights,
                              ffi::Buffer<ffi::F32> out_grad,
                              ffi::ResultBuffer<ffi::F32> qkv_grad) {
  return Backward(pool, qkv, weights, out_grad, nullptr, qkv_grad);
}

ffi::Error BackwardFromBoth(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                            ffi::Buffer<ffi::F32> weights,
                            ffi::Buffer<ffi::F32> out_grad,
                            ffi::Buffer<ffi::F32> weights_grad,
                            ffi::ResultBuffer<ffi::F32> qkv_grad) {
  Shape s;
  if (ffi::Error error = ShapeOf(qkv, &s); error.failure()) return error;
  if (ffi::Error error = CheckWeights(weights_grad, s); error.failure())
    return error;
  return Backward(pool, qkv, weights, out_grad, weights_grad.typed_data(),
                  qkv_grad);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitJaxAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitJaxAttentionBackward, BackwardFromOutput,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitJaxAttentionBackwardWithWeightsGrad,
                              BackwardFromBoth,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
