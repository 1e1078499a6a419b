// The side panels: the frame behind a point, the mean/std of a selection, the cluster legend, live health,
// and short notices. Each owns its DOM subtree and is fed plain data by app.js.

import { ApiError, getBlob, getJson, postForBlob } from './api.js';
import { clusterCss, clusterGlyph } from './colors.js';

// The LSE fetches at most 30 frames for a live selection; the service aggregates server-side, so more is
// affordable, but each frame is still a Tiled read: an even sample keeps the request bounded.
export const MAX_AGGREGATE_FRAMES = 64;

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('data-')) node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
};

const ms = (seconds) => (Number.isFinite(seconds) ? `${(seconds * 1000).toFixed(1)} ms` : '–');

/** Swap an <img>'s blob URL, releasing the previous one; resolves once the new image is decoded. */
async function setImageBlob(img, blob) {
  if (img.src.startsWith('blob:')) URL.revokeObjectURL(img.src);
  img.src = blob ? URL.createObjectURL(blob) : '';
  if (blob) await img.decode();
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener('abort', () => { clearTimeout(timer); reject(new DOMException('aborted', 'AbortError')); });
});

// The Tiled writer trails the live points (seconds for full-size frames on a busy machine), so a click on
// the newest point can come before its frame is stored: retry a 404 for a while instead of giving up.
const FRAME_RETRY_MS = 1000;
const FRAME_RETRIES = 30;

export class FramePanel {
  constructor(root) {
    this.root = root;
    this.img = root.querySelector('[data-testid="frame-image"]');
    this.info = root.querySelector('[data-testid="frame-info"]');
    this.status = root.querySelector('[data-testid="frame-status"]');
    this.abort = null;
  }

  async show(p) {
    if (this.abort) this.abort.abort();
    const abort = new AbortController();
    this.abort = abort;
    this.root.hidden = false;
    this.info.replaceChildren(
      ...[
        ['frame', `#${p.index}`],
        ['cluster', p.cluster < 0 ? 'unassigned' : `${clusterGlyph(p.cluster)} ${p.cluster}`],
        ['novelty', Number.isFinite(p.novelty) ? p.novelty.toFixed(3) : '–'],
        ['position', `${p.x.toFixed(3)}, ${p.y.toFixed(3)}`],
        ['total', ms(p.totalTime)],
        ['encoder', ms(p.autoencoderTime)],
        ['projection', ms(p.dimredTime)],
        ['time', Number.isFinite(p.timestamp) ? new Date(p.timestamp * 1000).toLocaleTimeString() : '–'],
      ].flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v, 'data-field': k })]),
    );
    const swatch = this.info.querySelector('[data-field="cluster"]');
    if (swatch) swatch.style.color = clusterCss(p.cluster);
    this.img.removeAttribute('data-loaded-index');
    if (!p.tiledUrl) {
      setImageBlob(this.img, null);
      this.status.textContent = 'This frame has no Tiled URI: nothing to show.';
      return;
    }
    this.status.textContent = `Loading frame #${p.index}…`;
    this.status.title = p.tiledUrl;
    try {
      let blob = null;
      for (let attempt = 0; blob === null; attempt += 1) {
        try {
          blob = await getBlob('api/frame', { url: p.tiledUrl }, { signal: abort.signal });
        } catch (err) {
          if (!(err instanceof ApiError && err.status === 404) || attempt >= FRAME_RETRIES) throw err;
          this.status.textContent = `Frame #${p.index} is not stored in Tiled yet; retrying…`;
          await sleep(FRAME_RETRY_MS, abort.signal);
        }
      }
      await setImageBlob(this.img, blob);
      this.img.alt = `frame ${p.index} (log scale)`;
      this.img.dataset.loadedIndex = String(p.index);
      this.status.textContent = `Frame #${p.index}, log-scaled intensity`;
    } catch (err) {
      if (err.name === 'AbortError') return;
      setImageBlob(this.img, null);
      this.status.textContent = `Could not load frame #${p.index}: ${err.message}`;
    }
  }

  /** A grey reference point's frame: the service reads it from where the bundle recorded it. */
  async showReference(i, x, y, cluster) {
    if (this.abort) this.abort.abort();
    const abort = new AbortController();
    this.abort = abort;
    this.root.hidden = false;
    this.info.replaceChildren(
      ...[
        ['reference', `#${i}`],
        ['cluster', cluster === undefined || cluster < 0 ? 'unassigned' : `${clusterGlyph(cluster)} ${cluster}`],
        ['position', `${x.toFixed(3)}, ${y.toFixed(3)}`],
      ].flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v, 'data-field': k })]),
    );
    this.img.removeAttribute('data-loaded-index');
    this.img.removeAttribute('data-loaded-reference');
    this.status.textContent = `Loading reference frame #${i}…`;
    try {
      const blob = await getBlob(`api/reference/frame/${i}`, {}, { signal: abort.signal });
      await setImageBlob(this.img, blob);
      this.img.alt = `reference frame ${i} (log scale)`;
      this.img.dataset.loadedReference = String(i);
      this.status.textContent = `Reference frame #${i}, log-scaled intensity`;
    } catch (err) {
      if (err.name === 'AbortError') return;
      setImageBlob(this.img, null);
      this.status.textContent = `Could not load reference frame #${i}: ${err.message}`;
    }
  }
}

/** Evenly spaced picks: the selection's extent in time stays represented. */
export function evenSample(items, max) {
  if (items.length <= max) return items.slice();
  return Array.from({ length: max }, (_, i) => items[Math.floor((i * items.length) / max)]);
}

export class SelectionPanel {
  constructor(root) {
    this.root = root;
    this.summary = root.querySelector('[data-testid="selection-summary"]');
    this.mean = root.querySelector('[data-testid="mean-image"]');
    this.std = root.querySelector('[data-testid="std-image"]');
    this.abort = null;
    this.count = 0;
  }

  clear() {
    if (this.abort) this.abort.abort();
    this.count = 0;
    this.summary.textContent = 'Choose Box or Lasso above the plot and drag over points to see their mean and spread.';
    for (const img of [this.mean, this.std]) {
      setImageBlob(img, null);
      img.removeAttribute('data-loaded-count');
    }
  }

  async show(points) {
    if (this.abort) this.abort.abort();
    const abort = new AbortController();
    this.abort = abort;
    this.count = points.length;
    const withUrl = points.filter((p) => p.tiledUrl);
    const sample = evenSample(withUrl, MAX_AGGREGATE_FRAMES);
    for (const img of [this.mean, this.std]) img.removeAttribute('data-loaded-count');
    if (!sample.length) {
      this.summary.textContent = points.length
        ? `${points.length} points selected, none with a frame URI.`
        : 'No points in the selection.';
      return;
    }
    const first = Math.min(...sample.map((p) => p.index));
    const last = Math.max(...sample.map((p) => p.index));
    const sampled = sample.length < withUrl.length ? ` (mean and std of ${sample.length}, evenly sampled)` : '';
    this.summary.textContent = `${points.length} frames selected, #${first}–#${last}${sampled}. Loading…`;
    const urls = sample.map((p) => p.tiledUrl);
    try {
      const [mean, std] = await Promise.all(
        ['mean', 'std'].map((stat) => postForBlob('api/aggregate', { urls, stat }, { signal: abort.signal })),
      );
      await Promise.all([setImageBlob(this.mean, mean.blob), setImageBlob(this.std, std.blob)]);
      // The Tiled writer trails the live points: the newest frames may not be stored yet.
      const used = Number(mean.headers.get('x-frame-count') ?? sample.length);
      const missing = Number(mean.headers.get('x-frames-missing') ?? 0);
      this.mean.dataset.loadedCount = String(used);
      this.std.dataset.loadedCount = String(used);
      const notYet = missing ? ` Mean and std of ${used}; ${missing} not yet stored.` : '';
      this.summary.textContent = `${points.length} frames selected, #${first}–#${last}${sampled}.${notYet}`;
    } catch (err) {
      if (err.name === 'AbortError') return;
      this.summary.textContent = `Could not compute the selection images: ${err.message}`;
    }
  }
}

export class ClusterLegend {
  constructor(root) {
    this.root = root;
    this.rows = new Map();
  }

  /** counts: Map cluster -> count. Rows are created once and updated in place. */
  update(counts) {
    const ids = [...counts.keys()].sort((a, b) => a - b);
    if (ids.length !== this.rows.size || ids.some((id) => !this.rows.has(id))) {
      this.rows.clear();
      this.root.replaceChildren(...ids.map((id) => {
        const count = el('span', { class: 'count' });
        const row = el('li', { 'data-cluster': String(id) },
          el('span', { class: 'glyph', text: clusterGlyph(id) }),
          el('span', { class: 'name', text: id < 0 ? 'unassigned' : `cluster ${id}` }),
          count);
        row.querySelector('.glyph').style.color = clusterCss(id);
        this.rows.set(id, { row, count });
        return row;
      }));
      if (!ids.length) this.root.replaceChildren(el('li', { class: 'empty', text: 'No points yet.' }));
    }
    for (const id of ids) {
      const text = counts.get(id).toLocaleString();
      const { count } = this.rows.get(id);
      if (count.textContent !== text) count.textContent = text;
    }
  }

  flash(cluster) {
    const entry = this.rows.get(cluster);
    if (!entry) return;
    entry.row.classList.remove('flash');
    void entry.row.offsetWidth; // restart the animation
    entry.row.classList.add('flash');
  }
}

export class Notices {
  constructor(root) {
    this.root = root;
  }

  push(text, kind = 'info', ttlMs = 8000) {
    const node = el('div', { class: `notice ${kind}`, text, 'data-kind': kind });
    this.root.prepend(node);
    while (this.root.children.length > 4) this.root.lastChild.remove();
    setTimeout(() => node.remove(), ttlMs);
  }
}

const STAGES = ['queue', 'preprocess', 'encode', 'project', 'cluster', 'total'];

function sumCounts(value) {
  if (Number.isFinite(value)) return value;
  if (value && typeof value === 'object') return Object.values(value).reduce((a, v) => a + sumCounts(v), 0);
  return 0;
}

function countTitle(value) {
  if (!value || typeof value !== 'object') return '';
  return Object.entries(value).filter(([, v]) => sumCounts(v) > 0).map(([k, v]) => `${k}: ${sumCounts(v)}`).join('\n');
}

/** Polls api/health once a second and shows frames/s, per-stage latency and drop/reject counts. */
export class HealthPanel {
  constructor(root, { intervalMs = 1000 } = {}) {
    this.root = root;
    this.intervalMs = intervalMs;
    this.timer = null;
    this.last = null;
    this.failures = 0;
  }

  start() {
    const tick = async () => {
      try {
        this.render(await getJson('api/health'));
        this.failures = 0;
      } catch (err) {
        this.failures += 1;
        this.root.dataset.state = 'unreachable';
        this.root.querySelector('[data-field="fps"]').textContent = '–';
        this.root.title = `health unavailable: ${err.message}`;
      }
      this.timer = setTimeout(tick, this.intervalMs);
    };
    tick();
  }

  render(h) {
    this.last = h;
    this.root.dataset.state = 'ok';
    this.root.title = '';
    const fps = h.frames_per_s;
    this.root.querySelector('[data-field="fps"]').textContent = Number.isFinite(fps) ? fps.toFixed(1) : '–';
    const stages = h.stage_p50_ms || {};
    const tbody = this.root.querySelector('[data-field="stages"]');
    const names = STAGES.filter((s) => s in stages).concat(Object.keys(stages).filter((s) => !STAGES.includes(s)));
    tbody.replaceChildren(...names.map((s) => el('tr', {},
      el('th', { text: s }),
      el('td', { text: Number.isFinite(stages[s]) ? `${stages[s].toFixed(1)} ms` : '–' }))));
    // The bridge counts its own drops (counters.dropped); `latent-stream serve` adds the pipeline's counters
    // (ingest and stages: rejected{reason}, dropped{reason}) under `ingest`.
    const pipeline = h.ingest || {};
    const counts = {
      dropped: { bridge: (h.counters || {}).dropped || {}, pipeline: pipeline.dropped || {} },
      rejected: { pipeline: pipeline.rejected || {} },
    };
    for (const key of ['dropped', 'rejected']) {
      const node = this.root.querySelector(`[data-field="${key}"]`);
      const total = sumCounts(counts[key]);
      node.textContent = total.toLocaleString();
      node.title = countTitle({ ...counts[key].bridge, ...counts[key].pipeline });
      node.classList.toggle('bad', total > 0);
    }
    // `latent-stream serve` also reports its Tiled writer: frames it had to store that did not get there.
    const persist = h.persist;
    this.root.querySelector('[data-field="persist"]').hidden = !persist;
    if (persist) {
      const node = this.root.querySelector('[data-field="not-stored"]');
      const total = sumCounts(persist.frames_not_written || {});
      node.textContent = total.toLocaleString();
      node.title = h.tiled_connected ? countTitle(persist.frames_not_written || {}) : 'Tiled is not answering yet';
      node.classList.toggle('bad', total > 0);
    }
  }
}

export async function fetchRuns() {
  const body = await getJson('api/runs');
  return Array.isArray(body) ? body : body.runs || [];
}

export async function fetchRunPoints(runId) {
  const body = await getJson(`api/runs/${encodeURIComponent(runId)}/points`);
  return Array.isArray(body) ? body : body.points || [];
}

export async function fetchReference() {
  return getJson('api/reference');
}
