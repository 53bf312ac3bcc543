// Fused EM routing on the CPU (models/em_cpu.py builds and calls this): votes, routing and the backward
// of one routing unit at a time, in per-thread buffers that stay in cache.
//
// The math is models/em_fast_routing.py's (docs/em_routing.md on votes centred on each parent's mean vote); tests
// hold the two together with models/em_routing.py in float64 and float32, values and gradients. A unit is
// the set of routing groups whose assignments compete: one group (receptive field) under patch
// competition, the L positions of one image under global competition. child_of (L·I) names the child
// each (position, slot) belongs to; the E-step normalises over all entries of a child (a softmax over
// its parents).
//
// Layouts: pf (I, G, 16) child poses per slot (row-major 4x4), Wrow (I, 4, J·4) the transforms as
// Wrow[i][k][j·4 + c] = W_ij[k][c], offsets (I, 16) or empty, acts (G, I), beta_u and beta_a (J). Groups of
// unit u are u·L .. u·L + L - 1. Votes are kept as V (L, J, I, 16); their squares are formed on the fly.

// ATen's SIMD vectors (at::vec::Vectorized, exp from SLEEF inside libtorch) at the width this build targets
#if defined(__AVX512F__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

enum CostNorm { kNone = 0, kZscore = 1, kScaled = 2 };
constexpr int64_t kBlocks = 16;  // units are split into this many blocks for the backward's partial sums

struct Config {
  int64_t I, J, L, G, children;
  int cost_norm;
  double var_floor;
  std::vector<double> lambdas;
  const int32_t* child_of;
  int64_t run;  // child_of comes in runs of this many consecutive children (see Unit::for_each_run)
};

template <typename T>
T log_sigmoid(T z) { return z < 0 ? z - std::log1p(std::exp(z)) : -std::log1p(std::exp(-z)); }

template <typename T>
T sigmoid(T z) { return z >= 0 ? T(1) / (T(1) + std::exp(-z)) : std::exp(z) / (T(1) + std::exp(z)); }

// x[0..n) = exp(x), vectorised (SLEEF, within 1 ulp)
template <typename T>
void exp_inplace(T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(x + i).exp().store(x + i);
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// Per-thread state of one unit. (L, J, ...) arrays are indexed [l][j][...]; "per iteration" arrays
// hold one such array per routing iteration, all kept for the backward.
template <typename T>
struct Unit {
  const Config& c;
  int64_t iters, LJ, LJI;
  std::vector<T> V, centre;               // (L, J, I, 16) centred votes; (L, J, 16) the centres
  std::vector<T> R, Rsum, m, q, var, ls;  // per iteration: R (L,J,I), Rsum (L,J), m (L,J,32) [E v, E v²], q, var, ls (L,J,16)
  std::vector<T> cost, logit, w, x;       // per iteration: cost, logit (L,J), w (L,J,32); x (L,J,I) scratch
  std::vector<T> child_max, child_sum;    // (children)
  std::vector<T> rows, centre_rows;       // (4, J·4): the votes of one slot, row r of every P W_j side by side

  explicit Unit(const Config& cfg)
      : c(cfg), iters(cfg.lambdas.size()), LJ(cfg.L * cfg.J), LJI(cfg.L * cfg.J * cfg.I), V(LJI * 16),
        centre(LJ * 16), R(iters * LJI), Rsum(iters * LJ), m(iters * LJ * 32), q(iters * LJ * 16),
        var(iters * LJ * 16), ls(iters * LJ * 16), cost(iters * LJ), logit(iters * LJ), w(iters * LJ * 32),
        x(LJI), child_max(cfg.children), child_sum(cfg.children), rows(cfg.J * 16), centre_rows(cfg.J * 16) {}


  // rows[r][j·4 + c] = (P W_ij)[r][c] + offset_i[r][c], for every parent j at once.
  void slot_votes(const T* P, const T* Wrow_i, const T* off_i) {
    const int64_t n = c.J * 4;
    for (int r = 0; r < 4; ++r) {
      T* out = &rows[r * n];
      const T p0 = P[r * 4], p1 = P[r * 4 + 1], p2 = P[r * 4 + 2], p3 = P[r * 4 + 3];
#pragma omp simd
      for (int64_t k = 0; k < n; ++k)
        out[k] = p0 * Wrow_i[k] + p1 * Wrow_i[n + k] + p2 * Wrow_i[2 * n + k] + p3 * Wrow_i[3 * n + k];
      if (off_i)
        for (int64_t j = 0; j < c.J; ++j)
          for (int k = 0; k < 4; ++k) out[j * 4 + k] += off_i[r * 4 + k];
    }
  }

  // V of group l = its votes centred on each parent's mean vote (the centre moves every mean by a
  // constant and changes no variance or assignment; it keeps E v² - mu² free of cancellation).
  void build_group(const T* pf, const T* Wrow, const T* off, int64_t g0, int64_t l) {
    const int64_t I = c.I, J = c.J, n = J * 4;
    std::fill(centre_rows.begin(), centre_rows.end(), T(0));
    for (int64_t i = 0; i < I; ++i) {
      slot_votes(pf + (i * c.G + g0 + l) * 16, Wrow + i * 4 * n, off ? off + i * 16 : nullptr);
#pragma omp simd
      for (int64_t k = 0; k < 4 * n; ++k) centre_rows[k] += rows[k];
      for (int64_t j = 0; j < J; ++j) {
        T* v = &V[((l * J + j) * I + i) * 16];
        for (int r = 0; r < 4; ++r)
          for (int k = 0; k < 4; ++k) v[r * 4 + k] = rows[r * n + j * 4 + k];
      }
    }
    for (int64_t j = 0; j < J; ++j) {
      T* ce = &centre[(l * J + j) * 16];
      for (int r = 0; r < 4; ++r)
        for (int k = 0; k < 4; ++k) ce[r * 4 + k] = centre_rows[r * n + j * 4 + k] / T(I);
      for (int64_t i = 0; i < I; ++i) {
        T* v = &V[((l * J + j) * I + i) * 16];
#pragma omp simd
        for (int h = 0; h < 16; ++h) v[h] -= ce[h];
      }
    }
  }

  // Calls f(child, k) for every run of slots: entries k .. k + run - 1 of an (L, J, I) array belong to
  // children child .. child + run - 1 (child_of comes in runs of consecutive children: a receptive-field
  // offset's types under global competition, all I slots under patch competition), so the loops over
  // a child's parents below run over contiguous children and vectorise.
  template <typename F>
  void for_each_run(F f) const {
    for (int64_t l = 0; l < c.L; ++l)
      for (int64_t j = 0; j < c.J; ++j)
        for (int64_t q = 0; q < c.I; q += c.run) f(int64_t(c.child_of[l * c.I + q]), (l * c.J + j) * c.I + q);
  }

  // The first R: uniform over each child's parents (what normalize gives for all-zero logits).
  void uniform(T* Rt) {
    const int64_t run = c.run;
    T* count = child_sum.data();
    std::fill(child_sum.begin(), child_sum.end(), T(0));
    for_each_run([&](int64_t ch, int64_t) {
#pragma omp simd
      for (int64_t b = 0; b < run; ++b) count[ch + b] += 1;
    });
    for_each_run([&](int64_t ch, int64_t k) {
#pragma omp simd
      for (int64_t b = 0; b < run; ++b) Rt[k + b] = T(1) / count[ch + b];
    });
  }

  // R = softmax of xs over all the parents of each child (both (L, J, I)).
  void normalize(const T* xs, T* Rt) {
    const int64_t run = c.run;
    T *mx = child_max.data(), *sum = child_sum.data();
    std::fill(child_max.begin(), child_max.end(), -std::numeric_limits<T>::infinity());
    std::fill(child_sum.begin(), child_sum.end(), T(0));
    for_each_run([&](int64_t ch, int64_t k) {
#pragma omp simd
      for (int64_t b = 0; b < run; ++b) mx[ch + b] = std::max(mx[ch + b], xs[k + b]);
    });
    for_each_run([&](int64_t ch, int64_t k) {
#pragma omp simd
      for (int64_t b = 0; b < run; ++b) Rt[k + b] = xs[k + b] - mx[ch + b];
      exp_inplace(Rt + k, run);
#pragma omp simd
      for (int64_t b = 0; b < run; ++b) sum[ch + b] += Rt[k + b];
    });
    for_each_run([&](int64_t ch, int64_t k) {
#pragma omp simd
      for (int64_t b = 0; b < run; ++b) Rt[k + b] /= sum[ch + b];
    });
  }

  // dx from dR for R = normalize(x): R (dR - sum over the child's parents of R dR); in place on dR.
  void normalize_backward(const T* Rt, T* dR) {
    const int64_t run = c.run;
    T* sum = child_sum.data();
    std::fill(child_sum.begin(), child_sum.end(), T(0));
    for_each_run([&](int64_t ch, int64_t k) {
#pragma omp simd
      for (int64_t b = 0; b < run; ++b) sum[ch + b] += Rt[k + b] * dR[k + b];
    });
    for_each_run([&](int64_t ch, int64_t k) {
#pragma omp simd
      for (int64_t b = 0; b < run; ++b) dR[k + b] = Rt[k + b] * (dR[k + b] - sum[ch + b]);
    });
  }

  // The J costs of one group -> normalised (models.em_routing.normalize_cost), in place.
  void normalize_cost(T* cst) const {
    const int64_t J = c.J;
    if (c.cost_norm == kScaled) {
      for (int64_t j = 0; j < J; ++j) cst[j] *= T(100.0 * J / c.I);
    } else if (c.cost_norm == kZscore) {
      T mean = 0, sq = 0;
      for (int64_t j = 0; j < J; ++j) mean += cst[j];
      mean /= T(J);
      for (int64_t j = 0; j < J; ++j) sq += (cst[j] - mean) * (cst[j] - mean);
      const T D = std::sqrt(sq / T(J)) + T(1e-6);
      for (int64_t j = 0; j < J; ++j) cst[j] = (cst[j] - mean) / D;
    }
  }

  // d cost from d normalised cost (g: the J values of one group), in place; cst: the costs before.
  void normalize_cost_backward(const T* cst, T* g) const {
    const int64_t J = c.J;
    if (c.cost_norm == kScaled) {
      for (int64_t j = 0; j < J; ++j) g[j] *= T(100.0 * J / c.I);
    } else if (c.cost_norm == kZscore) {  // y = u / D, u = cost - mean, D = sqrt(mean u²) + 1e-6
      T mean = 0, sq = 0, gD = 0, g_mean = 0;
      for (int64_t j = 0; j < J; ++j) mean += cst[j];
      mean /= T(J);
      for (int64_t j = 0; j < J; ++j) sq += (cst[j] - mean) * (cst[j] - mean);
      const T s = std::sqrt(sq / T(J)), D = s + T(1e-6);
      for (int64_t j = 0; j < J; ++j) gD -= g[j] * (cst[j] - mean) / (D * D);
      for (int64_t j = 0; j < J; ++j) {
        g[j] = g[j] / D + gD * (cst[j] - mean) / (T(J) * s);
        g_mean += g[j];
      }
      g_mean /= T(J);
      for (int64_t j = 0; j < J; ++j) g[j] -= g_mean;
    }
  }

  // Builds V and runs the EM iterations for the unit of groups g0 .. g0 + L - 1 (a: their activations
  // (L, I)). Each group's votes are built just before its first M-step, and each iteration's M- and
  // E-step of a group run back to back, while its votes are in cache.
  void route(const T* pf, const T* Wrow, const T* off, int64_t g0, const T* a, const T* bu, const T* ba) {
    const int64_t I = c.I, J = c.J;
    const T tiny = std::numeric_limits<T>::min(), log_2pi = T(std::log(2 * M_PI));
    uniform(R.data());  // the first R: uniform over each child's parents
    for (int64_t t = 0; t < iters; ++t) {
      const T lam = T(c.lambdas[t]);
      const bool last = t == iters - 1;
      T *Rt = &R[t * LJI], *Rs = &Rsum[t * LJ], *mt = &m[t * LJ * 32], *qt = &q[t * LJ * 16];
      T *vt = &var[t * LJ * 16], *lst = &ls[t * LJ * 16], *ct = &cost[t * LJ], *lt = &logit[t * LJ];
      T* wt = &w[t * LJ * 32];
      for (int64_t l = 0; l < c.L; ++l) {
        const T* al = a + l * I;
        if (t == 0) build_group(pf, Wrow, off, g0, l);
        // M-step: [sum_i R'v, sum_i R'v²] / sum_i R', then sigma² and the cost of each parent
        for (int64_t j = 0; j < J; ++j) {
          const int64_t lj = l * J + j;
          T S1[16] = {0}, S2[16] = {0};
          T rsum = 0;
          for (int64_t i = 0; i < I; ++i) {
            const T rp = Rt[lj * I + i] * al[i];
            rsum += rp;
            const T* v = &V[(lj * I + i) * 16];
#pragma omp simd
            for (int h = 0; h < 16; ++h) {
              const T rv = rp * v[h];
              S1[h] += rv;
              S2[h] += rv * v[h];
            }
          }
          Rs[lj] = rsum;
          const T d = std::max(rsum, tiny);
          T sum_ls = 0;
          for (int h = 0; h < 16; ++h) {
            const T m1 = S1[h] / d, m2 = S2[h] / d, qh = m2 - m1 * m1;
            mt[lj * 32 + h] = m1;
            mt[lj * 32 + 16 + h] = m2;
            qt[lj * 16 + h] = qh;
            vt[lj * 16 + h] = std::max(qh, T(0)) + T(c.var_floor);
            lst[lj * 16 + h] = T(0.5) * std::log(vt[lj * 16 + h]);
            sum_ls += bu[j] + lst[lj * 16 + h];
          }
          ct[lj] = sum_ls * rsum;
        }
        T nc[1024];  // J <= 1024 (checked)
        std::copy(ct + l * J, ct + l * J + J, nc);
        normalize_cost(nc);
        for (int64_t j = 0; j < J; ++j) lt[l * J + j] = lam * (ba[j] - nc[j]);
        if (last) continue;
        // E-step logits: log p_ij + log a_j = v.(mu/var) - v².(1/(2 var)) + const_j + logsigmoid(logit_j)
        for (int64_t j = 0; j < J; ++j) {
          const int64_t lj = l * J + j;
          T cst = log_sigmoid(lt[lj]) - 8 * log_2pi;
          T* wl = &wt[lj * 32];
          for (int h = 0; h < 16; ++h) {
            const T iv = T(1) / vt[lj * 16 + h], m1 = mt[lj * 32 + h];
            wl[h] = m1 * iv;
            wl[16 + h] = T(-0.5) * iv;
            cst += T(-0.5) * m1 * m1 * iv - lst[lj * 16 + h];
          }
          for (int64_t i = 0; i < I; ++i) {
            const T* v = &V[(lj * I + i) * 16];
            T s = 0;
#pragma omp simd reduction(+ : s)
            for (int h = 0; h < 16; ++h) s += v[h] * (wl[h] + v[h] * wl[16 + h]);
            x[lj * I + i] = s + cst;
          }
        }
      }
      if (!last) normalize(x.data(), &R[(t + 1) * LJI]);
    }
  }
};

void check(const torch::Tensor& pf, const torch::Tensor& Wrow, const torch::Tensor& acts,
           const torch::Tensor& child_of, int64_t L) {
  TORCH_CHECK(pf.dim() == 3 && pf.size(2) == 16 && Wrow.dim() == 3 && Wrow.size(1) == 4 &&
                  Wrow.size(0) == pf.size(0) && Wrow.size(2) % 4 == 0,
              "em_routing_cpu: pf must be (I, G, 16) and Wrow (I, 4, J*4)");
  TORCH_CHECK(acts.dim() == 2 && acts.size(0) == pf.size(1) && acts.size(1) == pf.size(0),
              "em_routing_cpu: acts must be (G, I)");
  TORCH_CHECK(L >= 1 && pf.size(1) % L == 0 && child_of.numel() == L * pf.size(0),
              "em_routing_cpu: bad unit layout");
  TORCH_CHECK(Wrow.size(2) / 4 <= 1024, "em_routing_cpu: at most 1024 parents");
}

template <typename T>
void forward_units(const Config& cfg, const torch::Tensor& pf, const torch::Tensor& Wrow, const torch::Tensor& off,
                   const torch::Tensor& acts, const torch::Tensor& bu, const torch::Tensor& ba, torch::Tensor& mu,
                   torch::Tensor& logit) {
  const int64_t I = cfg.I, J = cfg.J, L = cfg.L;
  const T *pfp = pf.data_ptr<T>(), *Wp = Wrow.data_ptr<T>(), *ap = acts.data_ptr<T>();
  const T *bup = bu.data_ptr<T>(), *bap = ba.data_ptr<T>(), *offp = off.numel() ? off.data_ptr<T>() : nullptr;
  T *mup = mu.data_ptr<T>(), *lgp = logit.data_ptr<T>();
  at::parallel_for(0, cfg.G / L, 1, [&](int64_t u0, int64_t u1) {
    Unit<T> unit(cfg);
    const int64_t last = cfg.lambdas.size() - 1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g0 = u * L;
      unit.route(pfp, Wp, offp, g0, ap + g0 * I, bup, bap);
      for (int64_t lj = 0; lj < L * J; ++lj) {
        lgp[g0 * J + lj] = unit.logit[last * L * J + lj];
        for (int h = 0; h < 16; ++h)
          mup[(g0 * J + lj) * 16 + h] = unit.m[(last * L * J + lj) * 32 + h] + unit.centre[lj * 16 + h];
      }
    }
  });
}

// The backward of one unit, after unit.route. Accumulates into d_acts and dpf (the unit's groups only)
// and into the block's partial dWrow, d_beta_u, d_beta_a. The gradient of [v, v²] is kept factored, as
// T taps d[v, v²]_lji = sum_t tap_t[l,j,i] coef_t[l,j] (M-steps: R' ⊗ dS, E-steps: dx ⊗ w), applied per
// group once its last tap is known. Only the E-step normalisation couples the groups of a unit, so everything
// between two normalisations runs group by group, while the group's votes are in cache.
template <typename T>
struct UnitBackward {
  Unit<T>& u;
  const Config& c;
  const int64_t g0;
  const T *pf, *Wrow, *a, *bu;
  T *dpf, *d_acts, *dWrow, *dbu, *dba;
  std::vector<T>&tap, &coef, &gR;  // (taps, L, J, I), (taps, L, J, 32), (L, J, I)
  // gradients reaching iteration t's mu, var, log sigma (L, J, 16) and logit (L, J), for the t at hand
  std::vector<T> g_mu, g_var, g_ls, g_logit;

  // M-step t of group l: from g_mu/g_var/g_ls/g_logit to gR = d R_t (and d acts, d betas, the tap)
  void m_step(int64_t t, int64_t l) {
    const int64_t I = c.I, J = c.J, LJ = c.L * J, LJI = LJ * I;
    const T lam = T(c.lambdas[t]), tiny = std::numeric_limits<T>::min();
    const T *Rt = &u.R[t * LJI], *Rs = &u.Rsum[t * LJ], *mt = &u.m[t * LJ * 32];
    const T *qt = &u.q[t * LJ * 16], *vt = &u.var[t * LJ * 16], *lst = &u.ls[t * LJ * 16];
    T *tap_M = &tap[2 * t * LJI], *coef_M = &coef[2 * t * LJ * 32];
    // logit = lam (beta_a - norm(cost)), cost = Rsum sum_h (beta_u + log sigma_h)
    T g_cost[1024];
    for (int64_t j = 0; j < J; ++j) {
      dba[j] += lam * g_logit[l * J + j];
      g_cost[j] = -lam * g_logit[l * J + j];
    }
    u.normalize_cost_backward(&u.cost[t * LJ + l * J], g_cost);
    const T* al = a + l * I;
    for (int64_t j = 0; j < J; ++j) {
      const int64_t lj = l * J + j;
      const T gc = g_cost[j], gcr = gc * Rs[lj];
      T g_Rsum = 0, g_m[32];
      dbu[j] += 16 * gcr;
      for (int h = 0; h < 16; ++h) {
        g_Rsum += gc * (bu[j] + lst[lj * 16 + h]);
        const T gv = g_var[lj * 16 + h] + (g_ls[lj * 16 + h] + gcr) * T(0.5) / vt[lj * 16 + h];
        const T gq = qt[lj * 16 + h] >= 0 ? gv : T(0);  // var = clamp_min(q, 0) + floor
        g_m[h] = g_mu[lj * 16 + h] - 2 * mt[lj * 32 + h] * gq;  // q = E v² - mu²
        g_m[16 + h] = gq;
      }
      const T d = std::max(Rs[lj], tiny);  // m = S / d
      T* g_S = &coef_M[lj * 32];
      T gSm = 0;
      for (int h = 0; h < 32; ++h) {
        g_S[h] = g_m[h] / d;
        gSm += g_S[h] * mt[lj * 32 + h];
      }
      if (Rs[lj] >= tiny) g_Rsum -= gSm;
      // S = sum_i R'_i [v_i, v_i²]: dR'_i = v_i.dS1 + v_i².dS2, tap R'_i
      for (int64_t i = 0; i < I; ++i) {
        const T* v = &u.V[(lj * I + i) * 16];
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int h = 0; h < 16; ++h) s += v[h] * (g_S[h] + v[h] * g_S[16 + h]);
        const T g_Rp = s + g_Rsum;
        tap_M[lj * I + i] = Rt[lj * I + i] * al[i];
        d_acts[(g0 + l) * I + i] += g_Rp * Rt[lj * I + i];  // R' = R a
        gR[lj * I + i] = g_Rp * al[i];
      }
    }
  }

  // E-step t of group l (between M-steps t and t+1), given gR = d of its logits x: sets the gradients
  // reaching iteration t's mu, var, log sigma and logit, and the tap
  void e_step(int64_t t, int64_t l) {
    const int64_t I = c.I, J = c.J, LJ = c.L * J, LJI = LJ * I;
    const T *wp = &u.w[t * LJ * 32], *lp = &u.logit[t * LJ];
    T *tap_E = &tap[(2 * t + 1) * LJI], *coef_E = &coef[(2 * t + 1) * LJ * 32];
    for (int64_t lj = l * J; lj < (l + 1) * J; ++lj) {
      // x_i = v_i.w1 + v_i².w2 + const + logsigmoid(logit): dw = sum_i dx_i [v_i, v_i²], tap dx_i
      T g_w[32] = {0}, g_const = 0;
      const T* wl = wp + lj * 32;
      for (int64_t i = 0; i < I; ++i) {
        const T gx = gR[lj * I + i];
        g_const += gx;
        tap_E[lj * I + i] = gx;
        const T* v = &u.V[(lj * I + i) * 16];
#pragma omp simd
        for (int h = 0; h < 16; ++h) {
          const T gv = gx * v[h];
          g_w[h] += gv;
          g_w[16 + h] += gv * v[h];
        }
      }
      std::copy(wl, wl + 32, &coef_E[lj * 32]);
      g_logit[lj] = g_const * sigmoid(-lp[lj]);
      // w = [mu/var, -1/(2 var)], const = sum_h (-mu²/(2 var) - log sigma_h) - 8 log 2π
      for (int h = 0; h < 16; ++h) {
        const T mu_v = wl[h], inv_var = -2 * wl[16 + h];
        g_mu[lj * 16 + h] = g_w[h] * inv_var - g_const * mu_v;
        g_var[lj * 16 + h] =
            (T(0.5) * g_w[16 + h] * inv_var - g_w[h] * mu_v) * inv_var + T(0.5) * g_const * mu_v * mu_v;
        g_ls[lj * 16 + h] = -g_const;
      }
    }
  }

  // Group l's taps are complete: dv_lji = sum_t tap_t (coef1_t + 2 v coef2_t), then through
  // v = P W (+ offset): dP = dv W^T, dW = P^T dv
  void votes(int64_t l) {
    const int64_t I = c.I, J = c.J, LJ = c.L * J, LJI = LJ * I, n = J * 4, taps = 2 * c.lambdas.size() - 1;
    T* rows = u.rows.data();  // (4, J·4): dv of one slot, laid out like the votes in slot_votes
    for (int64_t i = 0; i < I; ++i) {
      for (int64_t j = 0; j < J; ++j) {
        const int64_t lj = l * J + j;
        const T* v = &u.V[(lj * I + i) * 16];
        T dv[16] = {0};
        for (int64_t k = 0; k < taps; ++k) {
          const T tk = tap[k * LJI + lj * I + i];
          const T* ck = &coef[(k * LJ + lj) * 32];
#pragma omp simd
          for (int h = 0; h < 16; ++h) dv[h] += tk * (ck[h] + 2 * v[h] * ck[16 + h]);
        }
        for (int r = 0; r < 4; ++r)
          for (int k = 0; k < 4; ++k) rows[r * n + j * 4 + k] = dv[r * 4 + k];
      }
      const T* P = pf + (i * c.G + g0 + l) * 16;
      T* dP = dpf + (i * c.G + g0 + l) * 16;
      const T* Wi = Wrow + i * 4 * n;
      T* dWi = dWrow + i * 4 * n;
      for (int r = 0; r < 4; ++r)
        for (int k = 0; k < 4; ++k) {  // dP[r][k] = sum_(j,c) dv[r][(j,c)] Wrow[k][(j,c)]
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t e = 0; e < n; ++e) s += rows[r * n + e] * Wi[k * n + e];
          dP[r * 4 + k] += s;
        }
      for (int k = 0; k < 4; ++k) {  // dWrow[k][(j,c)] += sum_r P[r][k] dv[r][(j,c)]
        const T p0 = P[k], p1 = P[4 + k], p2 = P[8 + k], p3 = P[12 + k];
#pragma omp simd
        for (int64_t e = 0; e < n; ++e)
          dWi[k * n + e] += p0 * rows[e] + p1 * rows[n + e] + p2 * rows[2 * n + e] + p3 * rows[3 * n + e];
      }
    }
  }

  // The whole backward, from d mu and d logit of the last iteration (L, J, 16), (L, J).
  void run(const T* d_mu, const T* d_logit) {
    const int64_t L = c.L, LJ = L * c.J, last = c.lambdas.size() - 1;
    g_mu.assign(d_mu, d_mu + LJ * 16);
    g_logit.assign(d_logit, d_logit + LJ);
    g_var.assign(LJ * 16, T(0));
    g_ls.assign(LJ * 16, T(0));
    for (int64_t l = 0; l < L; ++l) {
      m_step(last, l);
      if (last == 0) votes(l);
    }
    for (int64_t t = last; t >= 1; --t) {
      u.normalize_backward(&u.R[t * LJ * c.I], gR.data());  // gR: now d of E-step t-1's logits
      for (int64_t l = 0; l < L; ++l) {
        e_step(t - 1, l);
        m_step(t - 1, l);
        if (t == 1) votes(l);  // the first R is uniform: a constant, so M-step 0 is the last tap
      }
    }
  }
};

template <typename T>
void backward_units(const Config& cfg, const torch::Tensor& pf, const torch::Tensor& Wrow, const torch::Tensor& off,
                    const torch::Tensor& acts, const torch::Tensor& bu, const torch::Tensor& ba,
                    const torch::Tensor& d_mu, const torch::Tensor& d_logit, int64_t blocks, torch::Tensor& dpf,
                    torch::Tensor& d_acts, torch::Tensor& dW_part, torch::Tensor& dbu_part, torch::Tensor& dba_part) {
  const int64_t I = cfg.I, J = cfg.J, L = cfg.L, units = cfg.G / L;
  const T *pfp = pf.data_ptr<T>(), *Wp = Wrow.data_ptr<T>(), *ap = acts.data_ptr<T>();
  const T *bup = bu.data_ptr<T>(), *bap = ba.data_ptr<T>(), *offp = off.numel() ? off.data_ptr<T>() : nullptr;
  const T *dmup = d_mu.data_ptr<T>(), *dlgp = d_logit.data_ptr<T>();
  T *dpfp = dpf.data_ptr<T>(), *dap = d_acts.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    Unit<T> unit(cfg);
    const int64_t LJ = L * J, taps = 2 * cfg.lambdas.size() - 1;
    std::vector<T> tap(taps * LJ * I), coef(taps * LJ * 32), gR(LJ * I);
    for (int64_t b = b0; b < b1; ++b) {
      T* dW = dW_part.data_ptr<T>() + b * I * J * 16;
      T *dbu = dbu_part.data_ptr<T>() + b * J, *dba = dba_part.data_ptr<T>() + b * J;
      for (int64_t u = b * units / blocks; u < (b + 1) * units / blocks; ++u) {
        const int64_t g0 = u * L;
        unit.route(pfp, Wp, offp, g0, ap + g0 * I, bup, bap);
        UnitBackward<T>{unit, cfg, g0, pfp, Wp, ap + g0 * I, bup, dpfp, dap, dW, dbu, dba, tap, coef, gR}.run(
            dmup + g0 * J * 16, dlgp + g0 * J);
      }
    }
  });
}

Config make_config(const torch::Tensor& pf, const torch::Tensor& Wrow, const torch::Tensor& child_of, int64_t L,
                   int64_t children, const std::vector<double>& lambdas, int64_t cost_norm, double var_floor) {
  TORCH_CHECK(child_of.scalar_type() == torch::kInt32 && child_of.is_contiguous(), "child_of: contiguous int32");
  TORCH_CHECK(cost_norm >= 0 && cost_norm <= 2 && !lambdas.empty(), "em_routing_cpu: bad options");
  const int64_t I = pf.size(0);
  const int32_t* ch = child_of.data_ptr<int32_t>();
  for (int64_t i = 0; i < L * I; ++i)
    TORCH_CHECK(ch[i] >= 0 && ch[i] < children, "em_routing_cpu: child_of out of range");
  int64_t run = 1;  // the longest run length that divides I and holds everywhere
  while (run < I && ch[run] == ch[0] + run) ++run;
  for (; run > 1; --run) {
    bool holds = I % run == 0;
    for (int64_t i = 0; holds && i < L * I; ++i) holds = (i % I) % run == 0 || ch[i] == ch[i - 1] + 1;
    if (holds) break;
  }
  return Config{I, Wrow.size(2) / 4, L, pf.size(1), children, int(cost_norm), var_floor, lambdas, ch, run};
}

}  // namespace

// Forward: poses (G, J, 16) and activation logits (G, J).
std::vector<torch::Tensor> em_forward(torch::Tensor pf, torch::Tensor Wrow, torch::Tensor off, torch::Tensor acts,
                                      torch::Tensor bu, torch::Tensor ba, torch::Tensor child_of, int64_t L,
                                      int64_t children, std::vector<double> lambdas, int64_t cost_norm,
                                      double var_floor) {
  check(pf, Wrow, acts, child_of, L);
  const Config cfg = make_config(pf, Wrow, child_of, L, children, lambdas, cost_norm, var_floor);
  auto mu = torch::empty({cfg.G, cfg.J, 16}, pf.options());
  auto logit = torch::empty({cfg.G, cfg.J}, pf.options());
  AT_DISPATCH_FLOATING_TYPES(pf.scalar_type(), "em_forward",
                             [&] { forward_units<scalar_t>(cfg, pf, Wrow, off, acts, bu, ba, mu, logit); });
  return {mu, logit};
}

// Backward: d pf (I, G, 16), d Wrow (I, 4, J·4), d acts (G, I), d beta_u (J), d beta_a (J).
std::vector<torch::Tensor> em_backward(torch::Tensor pf, torch::Tensor Wrow, torch::Tensor off, torch::Tensor acts,
                                       torch::Tensor bu, torch::Tensor ba, torch::Tensor child_of, int64_t L,
                                       int64_t children, std::vector<double> lambdas, int64_t cost_norm,
                                       double var_floor, torch::Tensor d_mu, torch::Tensor d_logit) {
  check(pf, Wrow, acts, child_of, L);
  const Config cfg = make_config(pf, Wrow, child_of, L, children, lambdas, cost_norm, var_floor);
  // a fixed number of blocks of units, each with its own partial sums of the shared parameters' gradients,
  // summed in order: the result does not depend on the number of threads or their schedule
  const int64_t blocks = std::min<int64_t>(cfg.G / L, kBlocks);
  auto dpf = torch::zeros_like(pf);
  auto d_acts = torch::zeros_like(acts);
  auto dW_part = torch::zeros({blocks, cfg.I, 4, cfg.J * 4}, Wrow.options());
  auto dbu_part = torch::zeros({blocks, cfg.J}, Wrow.options());
  auto dba_part = torch::zeros({blocks, cfg.J}, Wrow.options());
  AT_DISPATCH_FLOATING_TYPES(pf.scalar_type(), "em_backward", [&] {
    backward_units<scalar_t>(cfg, pf, Wrow, off, acts, bu, ba, d_mu, d_logit, blocks, dpf, d_acts, dW_part, dbu_part,
                             dba_part);
  });
  return {dpf, dW_part.sum(0), d_acts, dbu_part.sum(0), dba_part.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("em_forward", &em_forward, "fused EM routing forward (CPU)");
  m.def("em_backward", &em_backward, "fused EM routing backward (CPU)");
}
