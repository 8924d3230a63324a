/**
 * xoshiro128** (Blackman & Vigna): small, fast, good statistical quality, and easy to
 * do exactly in 32-bit JS integer math, so a seed gives the same stream on every platform.
 * One instance per request: no shared state between sequences.
 */
export class Rng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  /** seed: any safe integer >= 0 (both 32-bit halves are used). */
  constructor(seed: number) {
    const lo = seed >>> 0;
    const hi = Math.floor(seed / 0x1_0000_0000) >>> 0;
    // Two splitmix32 streams (one per seed half) expand the seed: nearby seeds give
    // unrelated streams, and s0 (determined by lo) and s3 (by hi) keep every seed distinct.
    const a = splitmix32(lo);
    const b = splitmix32(hi ^ 0x5bd1e995);
    this.s0 = a();
    this.s1 = (b() ^ a()) >>> 0;
    this.s2 = a();
    this.s3 = b();
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** A generator with the given raw state (for reference test vectors and snapshots). */
  static fromState(s0: number, s1: number, s2: number, s3: number): Rng {
    const r = new Rng(0);
    r.s0 = s0 >>> 0;
    r.s1 = s1 >>> 0;
    r.s2 = s2 >>> 0;
    r.s3 = s3 >>> 0;
    return r;
  }

  /** Uniform 32-bit unsigned integer. */
  nextU32(): number {
    const s1 = this.s1;
    const r = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0;
    const t = s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return r;
  }

  /** Uniform double in [0, 1) with 53 random bits (32-bit floats would bias tiny probabilities). */
  nextFloat(): number {
    const a = this.nextU32() >>> 5; // 27 bits
    const b = this.nextU32() >>> 6; // 26 bits
    return (a * 67108864 + b) / 9007199254740992;
  }
}

function splitmix32(seed: number): () => number {
  let x = seed | 0;
  return () => {
    x = (x + 0x9e3779b9) | 0;
    let t = x ^ (x >>> 16);
    t = Math.imul(t, 0x21f0aaad);
    t ^= t >>> 15;
    t = Math.imul(t, 0x735a2d97);
    return (t ^ (t >>> 15)) >>> 0;
  };
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** A fresh random seed (for requests that do not give one), in [0, 2^53). */
export function randomSeed(): number {
  const u = new Uint32Array(2);
  globalThis.crypto.getRandomValues(u);
  return (u[0]! & 0x1fffff) * 0x1_0000_0000 + u[1]!;
}
