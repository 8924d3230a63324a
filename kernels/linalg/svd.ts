/**
 * Small dense linear algebra in float64 for adapter merging: QR by modified Gram-Schmidt (twice, for
 * orthogonality) and SVD by one-sided Jacobi. Sizes here are [features, rank] with rank in the tens.
 */

/** Row-major float64 matrix. */
export interface Mat {
  rows: number;
  cols: number;
  data: Float64Array;
}

export function mat(rows: number, cols: number, data?: Float64Array): Mat {
  return { rows, cols, data: data ?? new Float64Array(rows * cols) };
}

export function matmul(a: Mat, b: Mat): Mat {
  if (a.cols !== b.rows) throw new Error(`matmul: ${a.rows}x${a.cols} by ${b.rows}x${b.cols}`);
  const out = mat(a.rows, b.cols);
  for (let i = 0; i < a.rows; i++) {
    for (let k = 0; k < a.cols; k++) {
      const v = a.data[i * a.cols + k]!;
      if (v === 0) continue;
      const bo = k * b.cols;
      const oo = i * b.cols;
      for (let j = 0; j < b.cols; j++) out.data[oo + j]! += v * b.data[bo + j]!;
    }
  }
  return out;
}

export function transpose(a: Mat): Mat {
  const out = mat(a.cols, a.rows);
  for (let i = 0; i < a.rows; i++) for (let j = 0; j < a.cols; j++) out.data[j * a.rows + i] = a.data[i * a.cols + j]!;
  return out;
}

/**
 * Thin QR of a [m, n] matrix (m >= n not required): Q [m, n] with orthonormal (or zero, for dependent columns)
 * columns and R [n, n] upper triangular, A = Q R.
 */
export function qr(a: Mat): { q: Mat; r: Mat } {
  const { rows: m, cols: n } = a;
  const q = mat(m, n, a.data.slice());
  const r = mat(n, n);
  const col = (j: number) => {
    const v = new Float64Array(m);
    for (let i = 0; i < m; i++) v[i] = q.data[i * n + j]!;
    return v;
  };
  let scale = 0;
  for (let j = 0; j < n; j++) {
    let s = 0;
    for (let i = 0; i < m; i++) s += q.data[i * n + j]! ** 2;
    scale = Math.max(scale, Math.sqrt(s));
  }
  const tiny = scale * 1e-13;
  for (let j = 0; j < n; j++) {
    const v = col(j);
    for (let pass = 0; pass < 2; pass++) {
      for (let k = 0; k < j; k++) {
        let dot = 0;
        for (let i = 0; i < m; i++) dot += q.data[i * n + k]! * v[i]!;
        r.data[k * n + j]! += dot;
        for (let i = 0; i < m; i++) v[i]! -= dot * q.data[i * n + k]!;
      }
    }
    let norm = 0;
    for (let i = 0; i < m; i++) norm += v[i]! ** 2;
    norm = Math.sqrt(norm);
    // A column dependent on the previous ones contributes nothing: its Q column stays zero.
    const keep = norm > tiny;
    r.data[j * n + j] = keep ? norm : 0;
    for (let i = 0; i < m; i++) q.data[i * n + j] = keep ? v[i]! / norm : 0;
  }
  return { q, r };
}

/**
 * SVD of a small [m, n] matrix by one-sided Jacobi: A = U diag(S) V^T with S descending,
 * U [m, n], V [n, n]. Accurate to float64 rounding.
 */
export function svd(a: Mat): { u: Mat; s: Float64Array; v: Mat } {
  const { rows: m, cols: n } = a;
  const w = a.data.slice(); // columns rotate in place: W = A V
  const v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) v[i * n + i] = 1;
  for (let sweep = 0; sweep < 60; sweep++) {
    let rotated = false;
    for (let p = 0; p < n - 1; p++) {
      for (let q = p + 1; q < n; q++) {
        let alpha = 0;
        let beta = 0;
        let gamma = 0;
        for (let i = 0; i < m; i++) {
          const x = w[i * n + p]!;
          const y = w[i * n + q]!;
          alpha += x * x;
          beta += y * y;
          gamma += x * y;
        }
        if (Math.abs(gamma) <= 1e-15 * Math.sqrt(alpha * beta) || gamma === 0) continue;
        rotated = true;
        const zeta = (beta - alpha) / (2 * gamma);
        const t = Math.sign(zeta || 1) / (Math.abs(zeta) + Math.sqrt(1 + zeta * zeta));
        const c = 1 / Math.sqrt(1 + t * t);
        const s = c * t;
        for (let i = 0; i < m; i++) {
          const x = w[i * n + p]!;
          const y = w[i * n + q]!;
          w[i * n + p] = c * x - s * y;
          w[i * n + q] = s * x + c * y;
        }
        for (let i = 0; i < n; i++) {
          const x = v[i * n + p]!;
          const y = v[i * n + q]!;
          v[i * n + p] = c * x - s * y;
          v[i * n + q] = s * x + c * y;
        }
      }
    }
    if (!rotated) break;
  }
  const sv = new Float64Array(n);
  for (let j = 0; j < n; j++) {
    let s = 0;
    for (let i = 0; i < m; i++) s += w[i * n + j]! ** 2;
    sv[j] = Math.sqrt(s);
  }
  const order = [...sv.keys()].sort((x, y) => sv[y]! - sv[x]!);
  const u = mat(m, n);
  const vs = mat(n, n);
  const s = new Float64Array(n);
  order.forEach((j, k) => {
    s[k] = sv[j]!;
    for (let i = 0; i < m; i++) u.data[i * n + k] = sv[j]! > 0 ? w[i * n + j]! / sv[j]! : 0;
    for (let i = 0; i < n; i++) vs.data[i * n + k] = v[i * n + j]!;
  });
  return { u, s, v: vs };
}
