// Block-sparse flash attention on the CPU: forward and backward over gathered key units.
//
// Semantics (exact, no approximation): for every listed query row-tile r (M queries) and
// its listed key units (each `unit` consecutive keys), softmax(scale * Q K^T) V over the
// union of those keys; a unit with a mask (Tq rows of ceil(unit / 8) bytes, bit j % 8 of byte
// j / 8 for key j; query row m uses row m % Tq) hides the pairs whose bit is 0. Rows that see no key get out 0 and lse -inf; out and
// lse rows of unlisted tiles are left as given. Backward is
// evaluated with a *given* lse and out (the global ones when this kernel computes one part
// of a split softmax): P = exp(S - lse), dS = P * (dO V^T - rowsum(dO * O)), and it adds
// into dq, dk, dv (or sets them, when it computes the whole softmax). FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better
// Parallelism and Work Partitioning", 2023) is the algorithm; this file keeps its working
// set (one query tile against <= kBlock keys) in cache with 64-row tiles, which PyTorch's
// CPU SDPA kernel splits into 32-row blocks.
//
// GEMMs go to the BLAS inside libtorch (Fortran sgemm_/dgemm_, column-major); the row-major
// matrices here are passed as their transposes. Work is scheduled dynamically over threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
}

namespace {

constexpr int64_t kBlock = 512;  // keys per inner block

// Column-major C(m x n) = alpha * op(A) op(B) + beta * C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
T row_max(const T* x, int64_t n) {
  int64_t i = 0;
  T best = -std::numeric_limits<T>::infinity();
  if (n >= Vec<T>::size()) {
    Vec<T> acc = Vec<T>::loadu(x);
    for (i = Vec<T>::size(); i + Vec<T>::size() <= n; i += Vec<T>::size())
      acc = at::vec::maximum(acc, Vec<T>::loadu(x + i));
    T tmp[Vec<T>::size()];
    acc.store(tmp);
    for (int64_t j = 0; j < Vec<T>::size(); ++j) best = std::max(best, tmp[j]);
  }
  for (; i < n; ++i) best = std::max(best, x[i]);
  return best;
}

// x <- exp(x - shift) in place; returns the sum.
template <typename T>
T exp_shift_sum(T* x, int64_t n, T shift) {
  const Vec<T> s(shift);
  Vec<T> acc(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) {
    Vec<T> e = (Vec<T>::loadu(x + i) - s).exp_u20();
    e.store(x + i);
    acc = acc + e;
  }
  T tmp[Vec<T>::size()];
  acc.store(tmp);
  T total = 0;
  for (int64_t j = 0; j < Vec<T>::size(); ++j) total += tmp[j];
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    total += x[i];
  }
  return total;
}

// dp <- p * (dp - delta) in place.
template <typename T>
void softmax_grad(const T* p, T* dp, int64_t n, T delta) {
  const Vec<T> d(delta);
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size())
    (Vec<T>::loadu(p + i) * (Vec<T>::loadu(dp + i) - d)).store(dp + i);
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

template <typename T>
void scale_row(T* x, int64_t n, T a) {
  const Vec<T> s(a);
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) (Vec<T>::loadu(x + i) * s).store(x + i);
  for (; i < n; ++i) x[i] *= a;
}

template <typename T>
void add_rows(T* dst, const T* src, int64_t n) {
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size())
    (Vec<T>::loadu(dst + i) + Vec<T>::loadu(src + i)).store(dst + i);
  for (; i < n; ++i) dst[i] += src[i];
}

// The key units [u0, u1) of one row tile, gathered into contiguous (nb x width) rows.
template <typename T>
int64_t gather_units(const T* src, int64_t width, int64_t unit, const int64_t* idx, int64_t u0,
                     int64_t u1, T* dst) {
  const int64_t run = unit * width;
  for (int64_t u = u0; u < u1; ++u) std::copy_n(src + idx[u] * run, run, dst + (u - u0) * run);
  return (u1 - u0) * unit;
}

template <typename T>
void scatter_add_units(T* dst, int64_t width, int64_t unit, const int64_t* idx, int64_t u0, int64_t u1,
                       const T* src) {
  const int64_t run = unit * width;
  for (int64_t u = u0; u < u1; ++u) add_rows(dst + idx[u] * run, src + (u - u0) * run, run);
}

// Runs fn(thread_slot, item) for items 0..n-1, dealt out dynamically to the threads.
template <typename F>
void for_each_dynamic(int64_t n, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = next++; i < n; i = next++) fn(t, i);
  });
}

struct Csr {
  const int64_t* rows;
  const int64_t* ptr;
  const int64_t* idx;
  const int64_t* mask_index;  // per listed unit: -1 (all visible) or a mask
  const uint8_t* masks;       // (n_masks, mask_rows, ceil(unit / 8)), bit-packed
  int64_t mask_rows;
  int64_t n;
  int64_t unit;
};

// Sets the hidden pairs of the masked units [u0, u1) in the logits S (M x nb) to -inf.
template <typename T>
void apply_masks(const Csr& c, int64_t u0, int64_t u1, int64_t M, int64_t nb, T* S) {
  const T hidden = -std::numeric_limits<T>::infinity();
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t mi = c.mask_index[u];
    if (mi < 0) continue;
    const int64_t row_bytes = (c.unit + 7) / 8;
    const uint8_t* mask = c.masks + mi * c.mask_rows * row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* row = mask + (m % c.mask_rows) * row_bytes;
      T* s = S + m * nb + (u - u0) * c.unit;
      for (int64_t j = 0; j < c.unit; ++j)
        if (!((row[j >> 3] >> (j & 7)) & 1)) s[j] = hidden;
    }
  }
}

Csr check_csr(const at::Tensor& rows, const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& mask_index,
              const at::Tensor& masks, int64_t unit, int64_t n_rows, int64_t n_units) {
  TORCH_CHECK(rows.dtype() == at::kLong && ptr.dtype() == at::kLong && idx.dtype() == at::kLong &&
                  mask_index.dtype() == at::kLong,
              "rows, ptr, idx and mask_index must be int64");
  TORCH_CHECK(rows.is_contiguous() && ptr.is_contiguous() && idx.is_contiguous() && mask_index.is_contiguous(),
              "rows, ptr, idx, mask_index: contiguous");
  TORCH_CHECK(masks.scalar_type() == at::kByte && masks.dim() == 3 && masks.is_contiguous() &&
                  masks.size(1) >= 1 && masks.size(2) == (unit + 7) / 8,
              "masks must be contiguous uint8 (n_masks, rows, ceil(unit / 8)), bit-packed");
  TORCH_CHECK(mask_index.numel() == idx.numel(), "mask_index must have one entry per listed unit");
  TORCH_CHECK(ptr.numel() == rows.numel() + 1, "ptr must have len(rows) + 1 entries");
  TORCH_CHECK(unit >= 1, "unit must be >= 1");
  const int64_t n = rows.numel();
  const int64_t* p = ptr.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0 && p[n] == idx.numel(), "ptr must run from 0 to len(idx)");
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(p[i] <= p[i + 1], "ptr must be non-decreasing");
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(r[i] >= 0 && r[i] < n_rows, "row id out of range");
  const int64_t* u = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) TORCH_CHECK(u[i] >= 0 && u[i] < n_units, "key unit out of range");
  const int64_t* mi = mask_index.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) TORCH_CHECK(mi[i] >= -1 && mi[i] < masks.size(0), "mask index out of range");
  return {r, p, u, mi, masks.data_ptr<uint8_t>(), masks.size(1), n, unit};
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Csr& c, double scale_d,
                  at::Tensor& out, at::Tensor& lse) {
  const int64_t M = q.size(1), D = q.size(2), Dv = v.size(1);
  const T scale = static_cast<T>(scale_d);
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
  T *O = out.data_ptr<T>(), *LSE = lse.data_ptr<T>();
  const int64_t units_per_block = std::max<int64_t>(1, kBlock / c.unit);
  const int64_t nb_max = units_per_block * c.unit;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<T>> buf(threads);
  for_each_dynamic(c.n, [&](int64_t t, int64_t i) {
    std::vector<T>& b = buf[t];
    if (b.empty()) b.resize(nb_max * (D + Dv) + M * nb_max + M * Dv + 2 * M);
    T* Kg = b.data();
    T* Vg = Kg + nb_max * D;
    T* S = Vg + nb_max * Dv;
    T* acc = S + M * nb_max;
    T* mx = acc + M * Dv;
    T* sum = mx + M;
    std::fill_n(acc, M * Dv, T(0));
    std::fill_n(mx, M, -std::numeric_limits<T>::infinity());
    std::fill_n(sum, M, T(0));
    const T* Qr = Q + c.rows[i] * M * D;
    for (int64_t u0 = c.ptr[i]; u0 < c.ptr[i + 1]; u0 += units_per_block) {
      const int64_t u1 = std::min(u0 + units_per_block, c.ptr[i + 1]);
      const int64_t nb = gather_units(K, D, c.unit, c.idx, u0, u1, Kg);
      gather_units(V, Dv, c.unit, c.idx, u0, u1, Vg);
      gemm('T', 'N', nb, M, D, scale, Kg, D, Qr, D, T(0), S, nb);
      apply_masks(c, u0, u1, M, nb, S);
      for (int64_t m = 0; m < M; ++m) {
        T* s = S + m * nb;
        const T new_max = std::max(mx[m], row_max(s, nb));
        if (std::isinf(new_max)) {  // nothing visible yet
          std::fill_n(s, nb, T(0));
          continue;
        }
        const T keep = std::exp(mx[m] - new_max);  // 0 on the first block
        sum[m] = sum[m] * keep + exp_shift_sum(s, nb, new_max);
        if (keep != T(1)) scale_row(acc + m * Dv, Dv, keep);
        mx[m] = new_max;
      }
      gemm('N', 'N', Dv, M, nb, T(1), Vg, Dv, S, nb, T(1), acc, Dv);
    }
    T* Or = O + c.rows[i] * M * Dv;
    T* Lr = LSE + c.rows[i] * M;
    for (int64_t m = 0; m < M; ++m) {
      const T inv = sum[m] > T(0) ? T(1) / sum[m] : T(0);
      for (int64_t d = 0; d < Dv; ++d) Or[m * Dv + d] = acc[m * Dv + d] * inv;
      Lr[m] = sum[m] > T(0) ? mx[m] + std::log(sum[m]) : -std::numeric_limits<T>::infinity();
    }
  });
}

// Backward of one row tile, adding into dq (its rows) and dk, dv (this thread's copy).
template <typename T>
void backward_row(const T* Q, const T* K, const T* V, const T* O, const T* dO, const T* LSE, const Csr& c,
                  int64_t i, int64_t M, int64_t D, int64_t Dv, T scale, bool set_dq, T* dQ, T* dK, T* dV,
                  std::vector<T>& b) {
  const int64_t units_per_block = std::max<int64_t>(1, kBlock / c.unit);
  const int64_t nb_max = units_per_block * c.unit;
  if (b.empty()) b.resize(2 * nb_max * (D + Dv) + 2 * M * nb_max + M);
  T* Kg = b.data();
  T* Vg = Kg + nb_max * D;
  T* dKg = Vg + nb_max * Dv;
  T* dVg = dKg + nb_max * D;
  T* P = dVg + nb_max * Dv;
  T* dP = P + M * nb_max;
  T* delta = dP + M * nb_max;
  const int64_t r = c.rows[i];
  const T *Qr = Q + r * M * D, *Or = O + r * M * Dv, *dOr = dO + r * M * Dv, *Lr = LSE + r * M;
  T* dQr = dQ + r * M * D;
  if (set_dq) std::fill_n(dQr, M * D, T(0));
  for (int64_t m = 0; m < M; ++m) {
    T s = 0;
    for (int64_t d = 0; d < Dv; ++d) s += Or[m * Dv + d] * dOr[m * Dv + d];
    delta[m] = s;
  }
  for (int64_t u0 = c.ptr[i]; u0 < c.ptr[i + 1]; u0 += units_per_block) {
    const int64_t u1 = std::min(u0 + units_per_block, c.ptr[i + 1]);
    const int64_t nb = gather_units(K, D, c.unit, c.idx, u0, u1, Kg);
    gather_units(V, Dv, c.unit, c.idx, u0, u1, Vg);
    gemm('T', 'N', nb, M, D, scale, Kg, D, Qr, D, T(0), P, nb);
    apply_masks(c, u0, u1, M, nb, P);
    for (int64_t m = 0; m < M; ++m) {
      if (std::isinf(Lr[m])) {
        std::fill_n(P + m * nb, nb, T(0));
      } else {
        exp_shift_sum(P + m * nb, nb, Lr[m]);
      }
    }
    gemm('N', 'T', Dv, nb, M, T(1), dOr, Dv, P, nb, T(0), dVg, Dv);
    gemm('T', 'N', nb, M, Dv, T(1), Vg, Dv, dOr, Dv, T(0), dP, nb);
    for (int64_t m = 0; m < M; ++m) softmax_grad(P + m * nb, dP + m * nb, nb, delta[m]);
    gemm('N', 'N', D, M, nb, scale, Kg, D, dP, nb, T(1), dQr, D);
    gemm('N', 'T', D, nb, M, scale, Qr, D, dP, nb, T(0), dKg, D);
    scatter_add_units(dK, D, c.unit, c.idx, u0, u1, dKg);
    scatter_add_units(dV, Dv, c.unit, c.idx, u0, u1, dVg);
  }
}

template <typename T>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                   const at::Tensor& dout, const at::Tensor& lse, const Csr& c, const at::Tensor& group_ptr,
                   double scale_d, bool overwrite, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t M = q.size(1), D = q.size(2), Dv = v.size(1);
  const T scale = static_cast<T>(scale_d);
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
  const T *O = o.data_ptr<T>(), *dO = dout.data_ptr<T>(), *LSE = lse.data_ptr<T>();
  T *dQ = dq.data_ptr<T>(), *dK = dk.data_ptr<T>(), *dV = dv.data_ptr<T>();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<T>> buf(threads);
  const int64_t n_groups = group_ptr.numel() - 1;
  const int64_t* gp = group_ptr.data_ptr<int64_t>();
  if (n_groups >= 4 * threads || n_groups % threads == 0) {
    // Group g writes only rows [g N / G, (g + 1) N / G) of dk and dv: a group per task, which
    // zeroes its own rows first when overwriting (in parallel, and no pass over memory before).
    const int64_t rows_k = n_groups ? k.size(0) / n_groups : 0;
    for_each_dynamic(n_groups, [&](int64_t t, int64_t g) {
      if (overwrite) {
        std::fill_n(dK + g * rows_k * D, rows_k * D, T(0));
        std::fill_n(dV + g * rows_k * Dv, rows_k * Dv, T(0));
      }
      for (int64_t i = gp[g]; i < gp[g + 1]; ++i)
        backward_row(Q, K, V, O, dO, LSE, c, i, M, D, Dv, scale, overwrite, dQ, dK, dV, buf[t]);
    });
    return;
  }
  // Few groups: each thread adds into its own dk/dv, summed at the end.
  const int64_t nk = dk.numel(), nv = dv.numel();
  std::vector<std::vector<T>> own(threads);
  for_each_dynamic(c.n, [&](int64_t t, int64_t i) {
    if (own[t].empty()) own[t].assign(nk + nv, T(0));
    backward_row(Q, K, V, O, dO, LSE, c, i, M, D, Dv, scale, overwrite, dQ, own[t].data(), own[t].data() + nk,
                 buf[t]);
  });
  at::parallel_for(0, nk + nv, 1 << 14, [&](int64_t a, int64_t e) {
    if (overwrite)
      for (int64_t j = a; j < e; ++j) (j < nk ? dK[j] : dV[j - nk]) = T(0);
    for (const auto& part : own) {
      if (part.empty()) continue;
      for (int64_t j = a; j < e; ++j) (j < nk ? dK[j] : dV[j - nk]) += part[j];
    }
  });
}

void check_dense(const at::Tensor& x, const char* name, int64_t dim, at::ScalarType dtype) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == dim, name, " must have ", dim, " dimensions, got ", x.dim());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", x.scalar_type());
}

// q (R, M, D) float32 or float64; k (N, D) and v (N, Dv) of its dtype, N a multiple of unit.
at::ScalarType check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t unit) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "q must be float32 or float64");
  check_dense(q, "q", 3, dt);
  check_dense(k, "k", 2, dt);
  check_dense(v, "v", 2, dt);
  TORCH_CHECK(unit >= 1, "unit must be >= 1, got ", unit);
  TORCH_CHECK(k.size(1) == q.size(2) && k.size(0) == v.size(0) && k.size(0) % unit == 0, "k/v shapes");
  return dt;
}

// q (R, M, D); k (N, D); v (N, Dv); out (R, M, Dv) and lse (R, M) are written for the listed rows
// (a row listing no unit gets out 0 and lse -inf).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
             const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& mask_index, const at::Tensor& masks,
             int64_t unit, double scale, at::Tensor out, at::Tensor lse) {
  const auto dt = check_qkv(q, k, v, unit);
  check_dense(out, "out", 3, dt);
  check_dense(lse, "lse", 2, dt);
  TORCH_CHECK(out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(2) == v.size(1), "out shape");
  TORCH_CHECK(lse.size(0) == q.size(0) && lse.size(1) == q.size(1), "lse shape");
  const Csr c = check_csr(rows, ptr, idx, mask_index, masks, unit, q.size(0), k.size(0) / unit);
  if (dt == at::kFloat) forward_impl<float>(q, k, v, c, scale, out, lse);
  else forward_impl<double>(q, k, v, c, scale, out, lse);
}

// group_ptr splits the listed rows into G runs, run g writing only rows [g N / G, (g + 1) N / G)
// of dk and dv (N = len(k)). dq, dk and dv are added to, unless overwrite: then the listed rows
// of dq and all of dk and dv are set (they may start uninitialised).
void backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& rows, const at::Tensor& ptr,
              const at::Tensor& idx, const at::Tensor& mask_index, const at::Tensor& masks,
              const at::Tensor& group_ptr, int64_t unit, double scale, bool overwrite, at::Tensor dq, at::Tensor dk,
              at::Tensor dv) {
  const auto dt = check_qkv(q, k, v, unit);
  check_dense(out, "out", 3, dt);
  check_dense(dout, "dout", 3, dt);
  check_dense(lse, "lse", 2, dt);
  check_dense(dq, "dq", 3, dt);
  check_dense(dk, "dk", 2, dt);
  check_dense(dv, "dv", 2, dt);
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes(), "grad shapes");
  TORCH_CHECK(out.sizes() == dout.sizes() && out.size(0) == q.size(0) && out.size(2) == v.size(1), "out shape");
  TORCH_CHECK(group_ptr.dtype() == at::kLong && group_ptr.is_contiguous() && group_ptr.numel() >= 1, "group_ptr");
  const Csr c = check_csr(rows, ptr, idx, mask_index, masks, unit, q.size(0), k.size(0) / unit);
  const int64_t* gp = group_ptr.data_ptr<int64_t>();
  TORCH_CHECK(gp[0] == 0 && gp[group_ptr.numel() - 1] == c.n, "group_ptr must run from 0 to len(rows)");
  const int64_t n_groups = group_ptr.numel() - 1;
  TORCH_CHECK(n_groups >= 1 ? k.size(0) % n_groups == 0 : k.size(0) == 0,
              "len(k) must be a multiple of the number of groups");
  if (dt == at::kFloat) backward_impl<float>(q, k, v, out, dout, lse, c, group_ptr, scale, overwrite, dq, dk, dv);
  else backward_impl<double>(q, k, v, out, dout, lse, c, group_ptr, scale, overwrite, dq, dk, dv);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "block-sparse flash attention forward (CPU)");
  m.def("backward", &backward, "block-sparse flash attention backward (CPU)");
}
