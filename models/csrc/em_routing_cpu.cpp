// Fused EM routing on the CPU (models/em_cpu.py builds and calls this): votes, routing and the backward
// of one routing unit at a time, in per-thread buffers that stay in cache.
//
// The math is models/em_fast_routing.py's (DESIGN §4 on centred votes VV = [v, v²]); tests hold the two
// together with models/em_routing.py in float64 and float32, values and gradients. A unit is the set
// of routing groups whose assignments compete: one group (receptive field) for patch competition, the L
// positions of one image for global competition. child_of (L·I) names the child each (position, slot)
// belongs to; the E-step normalises over all entries with the same child (a softmax over its parents).
//
// Layouts: pf (I, G, 16) child poses per slot, W (I, J, 16) row-major 4x4 transforms, offsets (I, 16)
// or empty, acts (G, I), beta_u and beta_a (J). Groups of unit u are u·L .. u·L + L - 1.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

enum CostNorm { kNone = 0, kZscore = 1, kScaled = 2 };

struct Config {
  int64_t I, J, L, G, children;
  int cost_norm;
  double var_floor;
  std::vector<double> lambdas;
  const int32_t* child_of;
};

template <typename T>
T log_sigmoid(T z) { return z < 0 ? z - std::log1p(std::exp(z)) : -std::log1p(std::exp(-z)); }

template <typename T>
T sigmoid(T z) { return z >= 0 ? T(1) / (T(1) + std::exp(-z)) : std::exp(z) / (T(1) + std::exp(z)); }

// Per-thread state of one unit; every (L, J, ...) array is indexed [l][j][...].
template <typename T>
struct Unit {
  const Config& c;
  int64_t iters, LJ, LJI;
  std::vector<T> VV, centre;                 // (L, J, I, 32) centred [v, v²]; (L, J, 16)
  std::vector<T> R, Rsum, m, q, var, ls;     // per iteration: R (L, J, I), Rsum (L, J), m (L, J, 32), q/var/ls (L, J, 16)
  std::vector<T> cost, logit, w, x;          // per iteration: cost/logit (L, J), w (L, J, 32); x (L, J, I) scratch
  std::vector<T> child_max, child_sum;       // (children)

  explicit Unit(const Config& cfg)
      : c(cfg), iters(cfg.lambdas.size()), LJ(cfg.L * cfg.J), LJI(cfg.L * cfg.J * cfg.I),
        VV(LJI * 32), centre(LJ * 16), R(iters * LJI), Rsum(iters * LJ), m(iters * LJ * 32), q(iters * LJ * 16),
        var(iters * LJ * 16), ls(iters * LJ * 16), cost(iters * LJ), logit(iters * LJ), w(iters * LJ * 32),
        x(LJI), child_max(cfg.children), child_sum(cfg.children) {}

  int32_t child(int64_t l, int64_t i) const { return c.child_of[l * c.I + i]; }

  // v_lji = P_i W_ij + offset_i, centred on each parent's mean vote, and its square.
  void build(const T* pf, const T* W, const T* off, int64_t g0) {
    const int64_t I = c.I, J = c.J;
    std::fill(centre.begin(), centre.end(), T(0));
    for (int64_t l = 0; l < c.L; ++l) {
      for (int64_t i = 0; i < I; ++i) {
        const T* P = pf + (i * c.G + g0 + l) * 16;
        for (int64_t j = 0; j < J; ++j) {
          const T* Wij = W + (i * J + j) * 16;
          T* v = &VV[((l * J + j) * I + i) * 32];
          for (int r = 0; r < 4; ++r) {
#pragma omp simd
            for (int k = 0; k < 4; ++k)
              v[r * 4 + k] = P[r * 4] * Wij[k] + P[r * 4 + 1] * Wij[4 + k] + P[r * 4 + 2] * Wij[8 + k] +
                             P[r * 4 + 3] * Wij[12 + k];
          }
          if (off) {
#pragma omp simd
            for (int h = 0; h < 16; ++h) v[h] += off[i * 16 + h];
          }
          T* ce = &centre[(l * J + j) * 16];
#pragma omp simd
          for (int h = 0; h < 16; ++h) ce[h] += v[h];
        }
      }
    }
    for (int64_t lj = 0; lj < LJ; ++lj) {
      T* ce = &centre[lj * 16];
      for (int h = 0; h < 16; ++h) ce[h] /= T(I);
      for (int64_t i = 0; i < I; ++i) {
        T* v = &VV[(lj * I + i) * 32];
#pragma omp simd
        for (int h = 0; h < 16; ++h) {
          T d = v[h] - ce[h];
          v[h] = d;
          v[16 + h] = d * d;
        }
      }
    }
  }

  // R = softmax of x over all the parents of each child (R and x are (L, J, I)).
  void normalize(const T* xs, T* Rt) {
    const int64_t I = c.I, J = c.J;
    std::fill(child_max.begin(), child_max.end(), -std::numeric_limits<T>::infinity());
    std::fill(child_sum.begin(), child_sum.end(), T(0));
    for (int64_t l = 0; l < c.L; ++l)
      for (int64_t j = 0; j < J; ++j)
        for (int64_t i = 0; i < I; ++i) {
          T& mx = child_max[child(l, i)];
          mx = std::max(mx, xs[(l * J + j) * I + i]);
        }
    for (int64_t l = 0; l < c.L; ++l)
      for (int64_t j = 0; j < J; ++j)
        for (int64_t i = 0; i < I; ++i) {
          int32_t ch = child(l, i);
          T e = std::exp(xs[(l * J + j) * I + i] - child_max[ch]);
          Rt[(l * J + j) * I + i] = e;
          child_sum[ch] += e;
        }
    for (int64_t l = 0; l < c.L; ++l)
      for (int64_t j = 0; j < J; ++j)
        for (int64_t i = 0; i < I; ++i) Rt[(l * J + j) * I + i] /= child_sum[child(l, i)];
  }

  // d x from d R for R = normalize(x): R (dR - sum over the child's parents of R dR); in place on dR.
  void normalize_backward(const T* Rt, T* dR) {
    const int64_t I = c.I, J = c.J;
    std::fill(child_sum.begin(), child_sum.end(), T(0));
    for (int64_t l = 0; l < c.L; ++l)
      for (int64_t j = 0; j < J; ++j)
        for (int64_t i = 0; i < I; ++i) child_sum[child(l, i)] += Rt[(l * J + j) * I + i] * dR[(l * J + j) * I + i];
    for (int64_t l = 0; l < c.L; ++l)
      for (int64_t j = 0; j < J; ++j)
        for (int64_t i = 0; i < I; ++i) {
          int64_t k = (l * J + j) * I + i;
          dR[k] = Rt[k] * (dR[k] - child_sum[child(l, i)]);
        }
  }

  // cost (J) of one group -> normalised, in place.
  void normalize_cost(T* cst) const {
    const int64_t J = c.J;
    if (c.cost_norm == kScaled) {
      for (int64_t j = 0; j < J; ++j) cst[j] *= T(100.0 * J / c.I);
    } else if (c.cost_norm == kZscore) {
      T mean = 0, sq = 0;
      for (int64_t j = 0; j < J; ++j) mean += cst[j];
      mean /= T(J);
      for (int64_t j = 0; j < J; ++j) sq += (cst[j] - mean) * (cst[j] - mean);
      T D = std::sqrt(sq / T(J)) + T(1e-6);
      for (int64_t j = 0; j < J; ++j) cst[j] = (cst[j] - mean) / D;
    }
  }

  // d cost from d normalised cost (g, J values of one group), in place; cst: the costs before.
  void normalize_cost_backward(const T* cst, T* g) const {
    const int64_t J = c.J;
    if (c.cost_norm == kScaled) {
      for (int64_t j = 0; j < J; ++j) g[j] *= T(100.0 * J / c.I);
    } else if (c.cost_norm == kZscore) {
      T mean = 0, sq = 0;
      for (int64_t j = 0; j < J; ++j) mean += cst[j];
      mean /= T(J);
      for (int64_t j = 0; j < J; ++j) sq += (cst[j] - mean) * (cst[j] - mean);
      T s = std::sqrt(sq / T(J)), D = s + T(1e-6);
      T gD = 0;  // y = u / D, u = cost - mean, D = sqrt(mean u²) + eps
      for (int64_t j = 0; j < J; ++j) gD -= g[j] * (cst[j] - mean) / (D * D);
      T gu_mean = 0;
      for (int64_t j = 0; j < J; ++j) {
        g[j] = g[j] / D + gD * (cst[j] - mean) / (T(J) * s);
        gu_mean += g[j];
      }
      gu_mean /= T(J);
      for (int64_t j = 0; j < J; ++j) g[j] -= gu_mean;
    }
  }

  // The EM iterations on VV; every iteration's small tensors are kept for the backward.
  void route(const T* a, const T* bu, const T* ba) {
    const int64_t I = c.I, J = c.J;
    const T tiny = std::numeric_limits<T>::min(), log_2pi = T(std::log(2 * M_PI));
    std::fill(x.begin(), x.end(), T(0));
    normalize(x.data(), R.data());
    for (int64_t t = 0; t < iters; ++t) {
      const T lam = T(c.lambdas[t]);
      const bool last = t == iters - 1;
      T *Rt = &R[t * LJI], *Rs = &Rsum[t * LJ], *mt = &m[t * LJ * 32], *qt = &q[t * LJ * 16];
      T *vt = &var[t * LJ * 16], *lst = &ls[t * LJ * 16], *ct = &cost[t * LJ], *lt = &logit[t * LJ];
      T* wt = &w[t * LJ * 32];
      for (int64_t l = 0; l < c.L; ++l) {
        const T* al = a + l * I;
        // M-step: [sum_i R'v, sum_i R'v²] / sum_i R', then sigma² and the cost of each parent
        for (int64_t j = 0; j < J; ++j) {
          const int64_t lj = l * J + j;
          T S[32] = {0};
          T rsum = 0;
          for (int64_t i = 0; i < I; ++i) {
            const T rp = Rt[lj * I + i] * al[i];
            rsum += rp;
            const T* v = &VV[(lj * I + i) * 32];
#pragma omp simd
            for (int h = 0; h < 32; ++h) S[h] += rp * v[h];
          }
          Rs[lj] = rsum;
          const T d = std::max(rsum, tiny);
          T sum_ls = 0;
          for (int h = 0; h < 16; ++h) {
            const T m1 = S[h] / d, m2 = S[16 + h] / d, qh = m2 - m1 * m1;
            mt[lj * 32 + h] = m1;
            mt[lj * 32 + 16 + h] = m2;
            qt[lj * 16 + h] = qh;
            vt[lj * 16 + h] = std::max(qh, T(0)) + T(c.var_floor);
            lst[lj * 16 + h] = T(0.5) * std::log(vt[lj * 16 + h]);
            sum_ls += bu[j] + lst[lj * 16 + h];
          }
          ct[lj] = sum_ls * rsum;
        }
        T nc[1024];  // J <= 1024 (checked by the caller)
        std::copy(ct + l * J, ct + l * J + J, nc);
        normalize_cost(nc);
        for (int64_t j = 0; j < J; ++j) lt[l * J + j] = lam * (ba[j] - nc[j]);
        if (last) continue;
        // E-step logits: log p_ij + log a_j = VV_ij . [mu/var, -1/(2 var)] + const_j + logsigmoid(logit_j)
        for (int64_t j = 0; j < J; ++j) {
          const int64_t lj = l * J + j;
          T cst = log_sigmoid(lt[lj]) - 8 * log_2pi;
          for (int h = 0; h < 16; ++h) {
            const T iv = T(1) / vt[lj * 16 + h], m1 = mt[lj * 32 + h];
            wt[lj * 32 + h] = m1 * iv;
            wt[lj * 32 + 16 + h] = T(-0.5) * iv;
            cst += T(-0.5) * m1 * m1 * iv - lst[lj * 16 + h];
          }
          const T* wl = &wt[lj * 32];
          for (int64_t i = 0; i < I; ++i) {
            const T* v = &VV[(lj * I + i) * 32];
            T s = 0;
#pragma omp simd reduction(+ : s)
            for (int h = 0; h < 32; ++h) s += v[h] * wl[h];
            x[lj * I + i] = s + cst;
          }
        }
      }
      if (!last) normalize(x.data(), &R[(t + 1) * LJI]);
    }
  }
};

void check(const torch::Tensor& pf, const torch::Tensor& W, const torch::Tensor& acts, const torch::Tensor& child_of,
           int64_t L) {
  TORCH_CHECK(pf.dim() == 3 && pf.size(2) == 16 && W.dim() == 3 && W.size(2) == 16 && W.size(0) == pf.size(0),
              "em_routing_cpu: pf must be (I, G, 16) and W (I, J, 16)");
  TORCH_CHECK(acts.dim() == 2 && acts.size(0) == pf.size(1) && acts.size(1) == pf.size(0),
              "em_routing_cpu: acts must be (G, I)");
  TORCH_CHECK(pf.size(1) % L == 0 && child_of.numel() == L * pf.size(0), "em_routing_cpu: bad unit layout");
  TORCH_CHECK(W.size(1) <= 1024, "em_routing_cpu: at most 1024 parents");
}

}  // namespace

template <typename T>
void forward_units(const Config& cfg, const torch::Tensor& pf, const torch::Tensor& W, const torch::Tensor& off,
                   const torch::Tensor& acts, const torch::Tensor& bu, const torch::Tensor& ba, torch::Tensor& mu,
                   torch::Tensor& logit) {
  const int64_t I = cfg.I, J = cfg.J, L = cfg.L;
  const T *pfp = pf.data_ptr<T>(), *Wp = W.data_ptr<T>(), *ap = acts.data_ptr<T>();
  const T *bup = bu.data_ptr<T>(), *bap = ba.data_ptr<T>(), *offp = off.numel() ? off.data_ptr<T>() : nullptr;
  T *mup = mu.data_ptr<T>(), *lgp = logit.data_ptr<T>();
  at::parallel_for(0, cfg.G / L, 1, [&](int64_t u0, int64_t u1) {
    Unit<T> unit(cfg);
    const int64_t last = cfg.lambdas.size() - 1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g0 = u * L;
      unit.build(pfp, Wp, offp, g0);
      unit.route(ap + g0 * I, bup, bap);
      for (int64_t lj = 0; lj < L * J; ++lj) {
        lgp[g0 * J + lj] = unit.logit[last * L * J + lj];
        for (int h = 0; h < 16; ++h)
          mup[(g0 * J + lj) * 16 + h] = unit.m[(last * L * J + lj) * 32 + h] + unit.centre[lj * 16 + h];
      }
    }
  });
}

// Forward: poses (G, J, 16) and activation logits (G, J).
std::vector<torch::Tensor> em_forward(torch::Tensor pf, torch::Tensor W, torch::Tensor off, torch::Tensor acts,
                                      torch::Tensor bu, torch::Tensor ba, torch::Tensor child_of, int64_t L,
                                      int64_t children, std::vector<double> lambdas, int64_t cost_norm,
                                      double var_floor) {
  check(pf, W, acts, child_of, L);
  const int64_t I = pf.size(0), G = pf.size(1), J = W.size(1);
  Config cfg{I, J, L, G, children, int(cost_norm), var_floor, lambdas, child_of.data_ptr<int32_t>()};
  auto mu = torch::empty({G, J, 16}, pf.options());
  auto logit = torch::empty({G, J}, pf.options());
  AT_DISPATCH_FLOATING_TYPES(pf.scalar_type(), "em_forward",
                             [&] { forward_units<scalar_t>(cfg, pf, W, off, acts, bu, ba, mu, logit); });
  return {mu, logit};
}

template <typename T>
void backward_units(const Config& cfg, const torch::Tensor& pf, const torch::Tensor& W, const torch::Tensor& off,
                    const torch::Tensor& acts, const torch::Tensor& bu, const torch::Tensor& ba,
                    const torch::Tensor& d_mu, const torch::Tensor& d_logit, int64_t blocks, torch::Tensor& dpf,
                    torch::Tensor& d_acts, torch::Tensor& dW_part, torch::Tensor& dbu_part, torch::Tensor& dba_part) {
  const int64_t I = cfg.I, J = cfg.J, L = cfg.L, G = cfg.G, units = G / L;
  const T *pfp = pf.data_ptr<T>(), *Wp = W.data_ptr<T>(), *ap = acts.data_ptr<T>();
  const T *bup = bu.data_ptr<T>(), *bap = ba.data_ptr<T>(), *offp = off.numel() ? off.data_ptr<T>() : nullptr;
  const T *dmup = d_mu.data_ptr<T>(), *dlgp = d_logit.data_ptr<T>();
  T *dpfp = dpf.data_ptr<T>(), *dap = d_acts.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    Unit<T> unit(cfg);
    const int64_t LJ = L * J, LJI = LJ * I, iters = cfg.lambdas.size();
    const T tiny = std::numeric_limits<T>::min();
    std::vector<T> dVV(LJI * 32), g_mu(LJ * 16), g_var(LJ * 16), g_ls(LJ * 16), g_logit(LJ), g_cost(LJ);
    std::vector<T> gR(LJI);
    for (int64_t b = b0; b < b1; ++b) {
      T *dW = dW_part.data_ptr<T>() + b * I * J * 16, *dbu = dbu_part.data_ptr<T>() + b * J;
      T* dba = dba_part.data_ptr<T>() + b * J;
      for (int64_t u = b * units / blocks; u < (b + 1) * units / blocks; ++u) {
        const int64_t g0 = u * L;
        const T* a = ap + g0 * I;
        unit.build(pfp, Wp, offp, g0);
        unit.route(a, bup, bap);
        std::fill(dVV.begin(), dVV.end(), T(0));
        std::copy(dmup + g0 * J * 16, dmup + (g0 + L) * J * 16, g_mu.begin());
        std::copy(dlgp + g0 * J, dlgp + (g0 + L) * J, g_logit.begin());
        std::fill(g_var.begin(), g_var.end(), T(0));
        std::fill(g_ls.begin(), g_ls.end(), T(0));
        for (int64_t t = iters - 1; t >= 0; --t) {
          const T lam = T(cfg.lambdas[t]);
          const T *Rt = &unit.R[t * LJI], *Rs = &unit.Rsum[t * LJ], *mt = &unit.m[t * LJ * 32];
          const T *qt = &unit.q[t * LJ * 16], *vt = &unit.var[t * LJ * 16], *lst = &unit.ls[t * LJ * 16];
          // logit = lam (beta_a - norm(cost)), cost = Rsum sum_h (beta_u + log sigma_h)
          for (int64_t l = 0; l < L; ++l) {
            for (int64_t j = 0; j < J; ++j) {
              dba[j] += lam * g_logit[l * J + j];
              g_cost[l * J + j] = -lam * g_logit[l * J + j];
            }
            unit.normalize_cost_backward(&unit.cost[t * LJ + l * J], &g_cost[l * J]);
          }
          for (int64_t l = 0; l < L; ++l) {
            const T* al = a + l * I;
            for (int64_t j = 0; j < J; ++j) {
              const int64_t lj = l * J + j;
              const T gc = g_cost[lj], gcr = gc * Rs[lj];
              T g_Rsum = 0, g_m[32];
              dbu[j] += 16 * gcr;
              for (int h = 0; h < 16; ++h) {
                g_Rsum += gc * (bup[j] + lst[lj * 16 + h]);
                const T gv = g_var[lj * 16 + h] + (g_ls[lj * 16 + h] + gcr) * T(0.5) / vt[lj * 16 + h];
                const T gq = qt[lj * 16 + h] >= 0 ? gv : T(0);
                g_m[h] = g_mu[lj * 16 + h] - 2 * mt[lj * 32 + h] * gq;
                g_m[16 + h] = gq;
              }
              const T d = std::max(Rs[lj], tiny);
              T g_S[32], gSm = 0;
              for (int h = 0; h < 32; ++h) {
                g_S[h] = g_m[h] / d;
                gSm += g_S[h] * mt[lj * 32 + h];
              }
              if (Rs[lj] >= tiny) g_Rsum -= gSm;
              // S = R' VV: dR'_i = VV_i . dS; VV's share R'_i dS
              for (int64_t i = 0; i < I; ++i) {
                const T rp = Rt[lj * I + i] * al[i];
                const T* v = &unit.VV[(lj * I + i) * 32];
                T* dv = &dVV[(lj * I + i) * 32];
                T s = 0;
#pragma omp simd reduction(+ : s)
                for (int h = 0; h < 32; ++h) {
                  s += v[h] * g_S[h];
                  dv[h] += rp * g_S[h];
                }
                const T g_Rp = s + g_Rsum;
                dap[(g0 + l) * I + i] += g_Rp * Rt[lj * I + i];
                gR[lj * I + i] = g_Rp * al[i];
              }
            }
          }
          if (t == 0) break;  // the first R is uniform: a constant
          unit.normalize_backward(Rt, gR.data());  // gR now holds d of the E-step logits x
          const T *wp = &unit.w[(t - 1) * LJ * 32], *lp = &unit.logit[(t - 1) * LJ];
          for (int64_t lj = 0; lj < LJ; ++lj) {
            // x = VV w + const + logsigmoid(logit): dw = sum_i dx_i VV_i; VV's share dx_i w
            T g_w[32] = {0}, g_const = 0;
            const T* wl = wp + lj * 32;
            for (int64_t i = 0; i < I; ++i) {
              const T gx = gR[lj * I + i];
              g_const += gx;
              const T* v = &unit.VV[(lj * I + i) * 32];
              T* dv = &dVV[(lj * I + i) * 32];
#pragma omp simd
              for (int h = 0; h < 32; ++h) {
                g_w[h] += gx * v[h];
                dv[h] += gx * wl[h];
              }
            }
            g_logit[lj] = g_const * sigmoid(-lp[lj]);
            // w = [mu/var, -1/(2 var)], const = sum_h (-mu²/(2 var) - log sigma_h) - 8 log 2π
            for (int h = 0; h < 16; ++h) {
              const T mu_v = wl[h], inv_var = -2 * wl[16 + h];
              g_mu[lj * 16 + h] = g_w[h] * inv_var - g_const * mu_v;
              g_var[lj * 16 + h] = (T(0.5) * g_w[16 + h] * inv_var - g_w[h] * mu_v) * inv_var +
                                   T(0.5) * g_const * mu_v * mu_v;
              g_ls[lj * 16 + h] = -g_const;
            }
          }
        }
        // through v² and the vote product v = P W (+ offset): dP = dv W^T, dW = P^T dv
        for (int64_t l = 0; l < L; ++l)
          for (int64_t i = 0; i < I; ++i) {
            const T* P = pfp + (i * G + g0 + l) * 16;
            T* dP = dpfp + (i * G + g0 + l) * 16;
            for (int64_t j = 0; j < J; ++j) {
              const T* v = &unit.VV[((l * J + j) * I + i) * 32];
              const T* dvv = &dVV[((l * J + j) * I + i) * 32];
              T dv[16];
#pragma omp simd
              for (int h = 0; h < 16; ++h) dv[h] = dvv[h] + 2 * v[h] * dvv[16 + h];
              const T* Wij = Wp + (i * J + j) * 16;
              T* dWij = dW + (i * J + j) * 16;
              for (int r = 0; r < 4; ++r)
                for (int k = 0; k < 4; ++k) {
                  dP[r * 4 + k] += dv[r * 4] * Wij[k * 4] + dv[r * 4 + 1] * Wij[k * 4 + 1] +
                                   dv[r * 4 + 2] * Wij[k * 4 + 2] + dv[r * 4 + 3] * Wij[k * 4 + 3];
                  dWij[k * 4 + r] += P[0 * 4 + k] * dv[0 * 4 + r] + P[1 * 4 + k] * dv[1 * 4 + r] +
                                     P[2 * 4 + k] * dv[2 * 4 + r] + P[3 * 4 + k] * dv[3 * 4 + r];
                }
            }
          }
      }
    }
  });
}

// Backward: d pf (I, G, 16), d W (I, J, 16), d acts (G, I), d beta_u (J), d beta_a (J).
std::vector<torch::Tensor> em_backward(torch::Tensor pf, torch::Tensor W, torch::Tensor off, torch::Tensor acts,
                                       torch::Tensor bu, torch::Tensor ba, torch::Tensor child_of, int64_t L,
                                       int64_t children, std::vector<double> lambdas, int64_t cost_norm,
                                       double var_floor, torch::Tensor d_mu, torch::Tensor d_logit) {
  check(pf, W, acts, child_of, L);
  const int64_t I = pf.size(0), G = pf.size(1), J = W.size(1), units = G / L;
  Config cfg{I, J, L, G, children, int(cost_norm), var_floor, lambdas, child_of.data_ptr<int32_t>()};
  // blocks of units, each with its own partial sums of the shared parameters' gradients (summed in order)
  const int64_t blocks = std::min<int64_t>(units, 4 * at::get_num_threads());
  auto dpf = torch::zeros_like(pf);
  auto d_acts = torch::zeros_like(acts);
  auto dW_part = torch::zeros({blocks, I, J, 16}, W.options());
  auto dbu_part = torch::zeros({blocks, J}, W.options());
  auto dba_part = torch::zeros({blocks, J}, W.options());
  AT_DISPATCH_FLOATING_TYPES(pf.scalar_type(), "em_backward", [&] {
    backward_units<scalar_t>(cfg, pf, W, off, acts, bu, ba, d_mu, d_logit, blocks, dpf, d_acts, dW_part, dbu_part,
                             dba_part);
  });
  return {dpf, dW_part.sum(0), d_acts, dbu_part.sum(0), dba_part.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("em_forward", &em_forward, "fused EM routing forward (CPU)");
  m.def("em_backward", &em_backward, "fused EM routing backward (CPU)");
}
