// The points of one run, in arrival order, in a growable typed array that the WebGL plot uploads from.

export const STRIDE = 4; // floats per point: x, y, frame index, cluster

export class RunStore {
  constructor(runId, { name = '', live = false } = {}) {
    this.runId = runId;
    this.name = name;
    this.live = live; // true while the service is streaming this run
    this.stopped = null; // the run_stop event, once it came
    this.n = 0;
    this.data = new Float32Array(1024 * STRIDE);
    this.meta = []; // per slot: the message fields the frame panel shows
    this.slotByIndex = new Map(); // frame index -> slot: drops duplicates after a reconnect backfill
    this.clusterCounts = new Map();
    this.minIndex = Infinity;
    this.maxIndex = -Infinity;
    this.bounds = { x0: Infinity, x1: -Infinity, y0: Infinity, y1: -Infinity };
    this.duplicates = 0;
  }

  /** Add one point; returns false (and counts it) when this frame index is already held. */
  add(p) {
    if (this.slotByIndex.has(p.index)) {
      this.duplicates += 1;
      return false;
    }
    if ((this.n + 1) * STRIDE > this.data.length) {
      const grown = new Float32Array(this.data.length * 2);
      grown.set(this.data);
      this.data = grown;
    }
    const o = this.n * STRIDE;
    this.data[o] = p.x;
    this.data[o + 1] = p.y;
    this.data[o + 2] = p.index;
    this.data[o + 3] = p.cluster;
    this.meta.push(p);
    this.slotByIndex.set(p.index, this.n);
    this.n += 1;
    this.clusterCounts.set(p.cluster, (this.clusterCounts.get(p.cluster) || 0) + 1);
    if (p.index < this.minIndex) this.minIndex = p.index;
    if (p.index > this.maxIndex) this.maxIndex = p.index;
    const b = this.bounds;
    if (p.x < b.x0) b.x0 = p.x;
    if (p.x > b.x1) b.x1 = p.x;
    if (p.y < b.y0) b.y0 = p.y;
    if (p.y > b.y1) b.y1 = p.y;
    return true;
  }

  /**
   * Re-clustering moved these frames (already held) to other clusters: `clusters[i]` is frame `indices[i]`'s
   * id now. Frames not held are skipped (a backfill brings them corrected). Returns the lowest slot that
   * changed, Infinity when none did.
   */
  recolour(indices, clusters) {
    let first = Infinity;
    const n = Math.min(indices.length, clusters.length);
    for (let i = 0; i < n; i += 1) {
      const slot = this.slotByIndex.get(indices[i]);
      const c = clusters[i];
      if (slot === undefined || !Number.isInteger(c)) continue;
      const p = this.meta[slot];
      if (p.cluster === c) continue;
      const left = (this.clusterCounts.get(p.cluster) || 1) - 1;
      if (left) this.clusterCounts.set(p.cluster, left);
      else this.clusterCounts.delete(p.cluster);
      this.clusterCounts.set(c, (this.clusterCounts.get(c) || 0) + 1);
      p.cluster = c;
      this.data[slot * STRIDE + 3] = c;
      if (slot < first) first = slot;
    }
    return first;
  }

  latest() {
    return this.n ? this.meta[this.n - 1] : null;
  }
}

/** A /ws point message -> the store's point record. Throws on a message the page cannot place. */
export function pointFromMessage(m) {
  const fv = m.feature_vector;
  if (!Array.isArray(fv) || fv.length < 2 || !Number.isFinite(fv[0]) || !Number.isFinite(fv[1])) {
    throw new Error(`point ${m.index}: feature_vector is not a finite [x, y]`);
  }
  if (!Number.isInteger(m.index)) throw new Error(`point without an integer index: ${m.index}`);
  return {
    runId: m.run_id,
    index: m.index,
    x: fv[0],
    y: fv[1],
    cluster: Number.isInteger(m.cluster) ? m.cluster : -1,
    novelty: m.novelty,
    tiledUrl: m.tiled_url,
    timestamp: m.timestamp,
    totalTime: m.total_processing_time,
    autoencoderTime: m.autoencoder_time,
    dimredTime: m.dimred_time,
  };
}

/** A compact REST row (/api/runs/{id}/points) -> the store's point record. */
export function pointFromRow(runId, r) {
  return {
    runId,
    index: r.index,
    x: r.x,
    y: r.y,
    cluster: Number.isInteger(r.cluster) ? r.cluster : -1,
    novelty: r.novelty,
    tiledUrl: r.tiled_url,
    timestamp: r.timestamp,
    totalTime: r.total_processing_time,
    autoencoderTime: r.autoencoder_time,
    dimredTime: r.dimred_time,
  };
}
