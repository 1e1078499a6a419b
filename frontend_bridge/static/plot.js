// A small WebGL scatter built for streaming.
//
// Why not Plotly: Plotly.extendTraces recomputes and re-uploads every trace on each call; measured in
// headless Chromium here it took ~30 ms at 1,000 points, ~130 ms at 20,000 and ~550 ms at 100,000, so a
// long scan would freeze the page. Here an append uploads only the new points (bufferSubData) and colour by
// frame index is computed in the vertex shader from a uniform range, so nothing is recoloured as the run
// grows. Drawing is incremental too: the canvas keeps its pixels, and a streaming frame draws only the new
// points on top (a full redraw happens only when the view, colour scale or marker size changes). Interaction (pan, zoom, click, box and lasso selection) is a linear scan over the typed array,
// done once per gesture, not per frame.

import { CLUSTER_PALETTE, SHAPE_COUNT, UNASSIGNED_COLOR, VIRIDIS_GLSL } from './colors.js';
import { STRIDE } from './store.js';

const MARGIN = { left: 60, right: 14, top: 12, bottom: 42 };
export const TRAJECTORY_LENGTH = 1000; // the faint line follows the most recent frames only
const DATA_RENDER_INTERVAL_MS = 50; // streaming redraws at most 20 per second; interaction is immediate
const MAX_DATA_RENDER_INTERVAL_MS = 1000;
const MAX_POINTS_PER_FRAME = 20000; // drawn per animation frame when (re)drawing many points
const PICK_RADIUS_PX = 10;
const CLICK_SLOP_PX = 4;

const VERTEX_SHADER = `
precision highp float;
attribute vec2 a_pos;
attribute float a_index;
attribute float a_cluster;
uniform vec2 u_scale;
uniform vec2 u_offset;
uniform float u_size;
uniform float u_mode;      // 0: colour by frame index, 1: colour by cluster, 2: flat u_color
uniform vec2 u_irange;     // first and last frame index of the run
uniform vec4 u_color;
uniform vec3 u_palette[${CLUSTER_PALETTE.length}];
uniform vec3 u_unassigned;
uniform float u_alpha;
varying vec4 v_color;
varying float v_shape;
${VIRIDIS_GLSL}
void main() {
  gl_Position = vec4(a_pos * u_scale + u_offset, 0.0, 1.0);
  gl_PointSize = u_size;
  float c = a_cluster;
  v_shape = c < 0.0 ? 0.0 : mod(c, ${SHAPE_COUNT}.0);
  if (u_mode < 0.5) {
    float t = clamp((a_index - u_irange.x) / max(u_irange.y - u_irange.x, 1.0), 0.0, 1.0);
    v_color = vec4(viridis(t), u_alpha);
  } else if (u_mode < 1.5) {
    vec3 col = c < 0.0 ? u_unassigned : u_palette[int(mod(c, ${CLUSTER_PALETTE.length}.0))];
    v_color = vec4(col, u_alpha);
  } else {
    v_color = u_color;
    v_shape = 0.0;
  }
}`;

// Marker shapes in point sprites: circle, square, diamond, triangle, cross (the legend's glyphs).
const FRAGMENT_SHADER = `
precision mediump float;
varying vec4 v_color;
varying float v_shape;
uniform float u_points;
void main() {
  if (u_points > 0.5) {
    vec2 p = gl_PointCoord * 2.0 - 1.0;
    float s = floor(v_shape + 0.5);
    float d;
    if (s < 0.5) d = length(p);
    else if (s < 1.5) d = max(abs(p.x), abs(p.y)) * 1.15;
    else if (s < 2.5) d = abs(p.x) + abs(p.y);
    else if (s < 3.5) d = max(p.y / 0.75, abs(p.x) / max((p.y + 0.95) * 0.55, 0.001));
    else d = max(min(abs(p.x - p.y), abs(p.x + p.y)) / 0.42, length(p));
    if (d > 1.0) discard;
  }
  gl_FragColor = v_color;
}`;

function compile(gl, type, source) {
  const shader = gl.createShader(type);
  gl.shaderSource(shader, source);
  gl.compileShader(shader);
  if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) {
    throw new Error(`shader compile failed: ${gl.getShaderInfoLog(shader)}`);
  }
  return shader;
}

function niceTicks(a, b, target = 6) {
  const span = b - a;
  if (!(span > 0)) return { ticks: [], decimals: 0 };
  const raw = span / target;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(a / step) * step; v <= b + step * 1e-9; v += step) ticks.push(v);
  return { ticks, decimals: Math.max(0, -Math.floor(Math.log10(step))) };
}

/** Marker size in CSS px, in half-pixel steps: large for a sparse run, smaller as it fills up. */
export function markerSize(n) {
  if (n <= 2000) return 7;
  return Math.max(3, Math.round(2 * (7 - 2.8 * Math.log10(n / 2000))) / 2);
}

/**
 * The top of the frame-index colour scale: the next of 1, 1.5, 2, 3, 5, 7.5 x 10^k at or above the last
 * index. Fixed between those steps, so points drawn earlier keep their colour while the run grows and the
 * full redraws needed to rescale happen O(log N) times over a run.
 */
export function colorTop(minIndex, maxIndex) {
  const span = Math.max(maxIndex - minIndex, 10);
  const mag = 10 ** Math.floor(Math.log10(span));
  const step = [1, 1.5, 2, 3, 5, 7.5, 10].map((m) => m * mag).find((t) => t >= span);
  return minIndex + step;
}

function pointInPolygon(x, y, poly) {
  let inside = false;
  for (let i = 0, j = poly.length - 1; i < poly.length; j = i, i += 1) {
    const [xi, yi] = poly[i];
    const [xj, yj] = poly[j];
    if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

export class ScatterPlot {
  /**
   * @param {HTMLElement} container
   * @param {{onPick?: (slot: number) => void, onSelect?: (slots: number[], shape: object) => void,
   *          onDrawn?: () => void, onPickReference?: (i: number) => void}} handlers
   */
  constructor(container, { onPick = () => {}, onSelect = () => {}, onDrawn = () => {},
    onPickReference = () => {} } = {}) {
    this.container = container;
    this.onPick = onPick;
    this.onPickReference = onPickReference; // a click that hits no run point but a grey reference point
    this.onSelect = onSelect;
    this.onDrawn = onDrawn; // after a render that drew new points
    this.store = null;
    this.uploaded = 0; // points of this.store already on the GPU
    this.stale = Infinity; // first slot whose GPU copy is out of date (a cluster_update recoloured it)
    this.gpuCapacity = 0;
    this.refCount = 0;
    this.refBounds = null;
    this.refData = null; // the reference points, kept for picking
    this.colorMode = 'index';
    this.mode = 'pan';
    this.frozen = false; // paused: new points wait in the store and are not drawn
    this.autoscale = true;
    this.view = { x0: -1, x1: 1, y0: -1, y1: 1 };
    this.picked = -1;
    this.selection = null; // {type: 'box'|'lasso', ...} in data coordinates
    this.drag = null;
    this.renderPending = false;
    this.lastRender = 0;
    this.renders = 0;
    this.dataInterval = DATA_RENDER_INTERVAL_MS;
    this.drawnKey = '';
    this.canvasCount = 0; // points of the store on the canvas since the last full redraw
    this.fullRedraws = 0;
    this.colorRange = [0, 0];
    this.frameAskedAt = 0;
    this.frameLatency = 0;
    this.renderMs = { total: 0, max: 0, upload: 0, overlay: 0 }; // main-thread cost, for the benchmark
    this._renderBound = () => this._render();

    this.glCanvas = document.createElement('canvas');
    this.glCanvas.className = 'plot-gl';
    this.overlay = document.createElement('canvas');
    this.overlay.className = 'plot-overlay';
    this.overlay.dataset.testid = 'plot-overlay';
    container.append(this.glCanvas, this.overlay);

    // No MSAA: it multiplies the fill cost, which dominates on software GL.
    // The buffer is kept between frames: streaming frames draw only the new points onto it.
    const gl = this.glCanvas.getContext('webgl', { alpha: false, antialias: false, preserveDrawingBuffer: true });
    if (!gl) throw new Error('WebGL is not available in this browser');
    this.gl = gl;
    this._initGl();
    this._bindEvents();
    new ResizeObserver(() => this._resize()).observe(container);
    this._resize();
  }

  _initGl() {
    const { gl } = this;
    const program = gl.createProgram();
    gl.attachShader(program, compile(gl, gl.VERTEX_SHADER, VERTEX_SHADER));
    gl.attachShader(program, compile(gl, gl.FRAGMENT_SHADER, FRAGMENT_SHADER));
    gl.linkProgram(program);
    if (!gl.getProgramParameter(program, gl.LINK_STATUS)) {
      throw new Error(`shader link failed: ${gl.getProgramInfoLog(program)}`);
    }
    gl.useProgram(program);
    this.program = program;
    this.attr = {};
    for (const name of ['a_pos', 'a_index', 'a_cluster']) this.attr[name] = gl.getAttribLocation(program, name);
    this.uni = {};
    for (const name of ['u_scale', 'u_offset', 'u_size', 'u_mode', 'u_irange', 'u_color', 'u_palette',
      'u_unassigned', 'u_alpha', 'u_points']) {
      this.uni[name] = gl.getUniformLocation(program, name);
    }
    gl.uniform3fv(this.uni.u_palette, new Float32Array(CLUSTER_PALETTE.flat()));
    gl.uniform3fv(this.uni.u_unassigned, new Float32Array(UNASSIGNED_COLOR));
    this.pointBuffer = gl.createBuffer();
    this.refBuffer = gl.createBuffer();
    gl.enable(gl.BLEND);
    gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
  }

  // ---- data ----------------------------------------------------------------------------------------

  /** The bundle's reference embedding: grey background points, drawn under the run. */
  setReference(xs, ys) {
    const n = Math.min(xs.length, ys.length);
    const data = new Float32Array(n * STRIDE);
    const b = { x0: Infinity, x1: -Infinity, y0: Infinity, y1: -Infinity };
    for (let i = 0; i < n; i += 1) {
      data[i * STRIDE] = xs[i];
      data[i * STRIDE + 1] = ys[i];
      data[i * STRIDE + 3] = -1;
      b.x0 = Math.min(b.x0, xs[i]); b.x1 = Math.max(b.x1, xs[i]);
      b.y0 = Math.min(b.y0, ys[i]); b.y1 = Math.max(b.y1, ys[i]);
    }
    const { gl } = this;
    gl.bindBuffer(gl.ARRAY_BUFFER, this.refBuffer);
    gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
    this.refCount = n;
    this.refBounds = n ? b : null;
    this.refData = data;
    this.fitted = false;
    this.requestRender();
  }

  /** Show another run's store (a full upload, once); later appends to it upload only what is new. */
  show(store) {
    this.store = store;
    this.uploaded = 0;
    this.stale = Infinity;
    this.gpuCapacity = 0;
    this.picked = -1;
    this.selection = null;
    this.autoscale = true;
    this.fitted = false;
    this.requestRender();
  }

  /** New points were added to the shown store. */
  pointsAdded() {
    if (!this.frozen) this.requestRender(true);
  }

  /** Points from slot `first` on changed cluster: upload them again and redraw in full (colour and shape). */
  pointsRecoloured(first) {
    if (first < this.stale) this.stale = first;
    this.requestRender();
  }

  /** Whether recoloured points still wait to be uploaded (while paused, or before the next render). */
  recolourPending() {
    return this.stale < this.uploaded;
  }

  /** Number of points of the shown run drawn on the plot. */
  drawnCount() {
    return this.uploaded;
  }

  setFrozen(frozen) {
    this.frozen = frozen;
    this.requestRender();
  }

  setColorMode(mode) {
    this.colorMode = mode;
    this.requestRender();
  }

  setMode(mode) {
    this.mode = mode;
    this.overlay.dataset.mode = mode;
  }

  resetView() {
    this.autoscale = true;
    this.fitted = false;
    this.requestRender();
  }

  setPicked(slot) {
    this.picked = slot;
    this.requestRender();
  }

  clearSelection() {
    this.selection = null;
    this.requestRender();
  }

  _upload() {
    const { gl, store } = this;
    if (!store || this.frozen) return;
    if (this.stale < this.uploaded) {
      gl.bindBuffer(gl.ARRAY_BUFFER, this.pointBuffer);
      gl.bufferSubData(gl.ARRAY_BUFFER, this.stale * STRIDE * 4,
        store.data.subarray(this.stale * STRIDE, this.uploaded * STRIDE));
      this.drawnKey = ''; // points already on the canvas changed: the next draw is a full one
    }
    this.stale = Infinity;
    if (this.uploaded === store.n) return;
    gl.bindBuffer(gl.ARRAY_BUFFER, this.pointBuffer);
    const capacity = store.data.length / STRIDE;
    if (capacity > this.gpuCapacity) {
      // Grows by doubling with the store: a full copy O(log N) times over a run.
      gl.bufferData(gl.ARRAY_BUFFER, store.data, gl.DYNAMIC_DRAW);
      this.gpuCapacity = capacity;
    } else {
      gl.bufferSubData(gl.ARRAY_BUFFER, this.uploaded * STRIDE * 4,
        store.data.subarray(this.uploaded * STRIDE, store.n * STRIDE));
    }
    this.uploaded = store.n;
  }

  // ---- geometry ------------------------------------------------------------------------------------

  _plotRect() {
    const w = this.cssWidth - MARGIN.left - MARGIN.right;
    const h = this.cssHeight - MARGIN.top - MARGIN.bottom;
    return { left: MARGIN.left, top: MARGIN.top, width: Math.max(w, 1), height: Math.max(h, 1) };
  }

  /** Data -> CSS pixels relative to the plot container. */
  dataToScreen(x, y) {
    const r = this._plotRect();
    const v = this.view;
    return [
      r.left + ((x - v.x0) / (v.x1 - v.x0)) * r.width,
      r.top + (1 - (y - v.y0) / (v.y1 - v.y0)) * r.height,
    ];
  }

  screenToData(px, py) {
    const r = this._plotRect();
    const v = this.view;
    return [
      v.x0 + ((px - r.left) / r.width) * (v.x1 - v.x0),
      v.y0 + (1 - (py - r.top) / r.height) * (v.y1 - v.y0),
    ];
  }

  /** The slot of the drawn point nearest to (px, py) within PICK_RADIUS_PX, or -1. Later points win ties. */
  pick(px, py) {
    const { store } = this;
    if (!store) return -1;
    return this._nearest(store.data, this.uploaded, px, py, true);
  }

  /** The index of the reference point nearest to (px, py) within PICK_RADIUS_PX, or -1. */
  pickReference(px, py) {
    const d = this.refData;
    if (!d || !this.refCount) return -1;
    return this._nearest(d, this.refCount, px, py, false);
  }

  /** The nearest of `count` points in `d` (STRIDE floats each) within PICK_RADIUS_PX of (px, py), or -1. */
  _nearest(d, count, px, py, laterWinsTies) {
    const r = this._plotRect();
    const v = this.view;
    const sx = r.width / (v.x1 - v.x0);
    const sy = r.height / (v.y1 - v.y0);
    let best = -1;
    let bestD = PICK_RADIUS_PX * PICK_RADIUS_PX;
    for (let i = 0; i < count; i += 1) {
      const dx = r.left + (d[i * STRIDE] - v.x0) * sx - px;
      const dy = r.top + r.height - (d[i * STRIDE + 1] - v.y0) * sy - py;
      const dd = dx * dx + dy * dy;
      if (dd < bestD || (laterWinsTies && dd === bestD)) { bestD = dd; best = i; }
    }
    return best;
  }

  _select(shape) {
    const { store } = this;
    const slots = [];
    if (!store) return slots;
    const d = store.data;
    for (let i = 0; i < this.uploaded; i += 1) {
      const x = d[i * STRIDE];
      const y = d[i * STRIDE + 1];
      if (x < shape.x0 || x > shape.x1 || y < shape.y0 || y > shape.y1) continue;
      if (shape.type === 'lasso' && !pointInPolygon(x, y, shape.points)) continue;
      slots.push(i);
    }
    return slots;
  }

  _fit() {
    const b = this.store && this.store.n ? this.store.bounds : null;
    const v = this.view;
    if (this.fitted && (!b || (b.x0 >= v.x0 && b.x1 <= v.x1 && b.y0 >= v.y0 && b.y1 <= v.y1))) return;
    this.fitted = true;
    const boxes = [this.refBounds, this.store && this.store.n ? this.store.bounds : null].filter(Boolean);
    if (!boxes.length) return;
    let x0 = Math.min(...boxes.map((b) => b.x0));
    let x1 = Math.max(...boxes.map((b) => b.x1));
    let y0 = Math.min(...boxes.map((b) => b.y0));
    let y1 = Math.max(...boxes.map((b) => b.y1));
    const px = Math.max((x1 - x0) * 0.05, 1e-3);
    const py = Math.max((y1 - y0) * 0.05, 1e-3);
    x0 -= px; x1 += px; y0 -= py; y1 += py;
    this.view = { x0, x1, y0, y1 };
  }

  // ---- rendering -----------------------------------------------------------------------------------

  requestRender(fromData = false) {
    if (this.renderPending) return;
    this.renderPending = true;
    const wait = fromData ? this.lastRender + this.dataInterval - performance.now() : 0;
    const ask = () => {
      this.frameAskedAt = performance.now();
      requestAnimationFrame(this._renderBound);
    };
    if (wait > 0) setTimeout(ask, wait);
    else ask();
  }

  // When frames come late (a slow GPU, or software GL filling many points), streaming redraws back off so
  // the main thread stays free for input; interaction still redraws on the next frame.
  _adaptInterval(now) {
    const latency = now - this.frameAskedAt;
    this.frameLatency = 0.8 * this.frameLatency + 0.2 * latency;
    this.dataInterval = Math.min(MAX_DATA_RENDER_INTERVAL_MS,
      Math.max(DATA_RENDER_INTERVAL_MS, 3 * this.frameLatency));
  }

  _resize() {
    const dpr = window.devicePixelRatio || 1;
    const rect = this.container.getBoundingClientRect();
    this.cssWidth = Math.max(rect.width, 50);
    this.cssHeight = Math.max(rect.height, 50);
    this.dpr = dpr;
    const r = this._plotRect();
    Object.assign(this.glCanvas.style, {
      left: `${r.left}px`, top: `${r.top}px`, width: `${r.width}px`, height: `${r.height}px`,
    });
    this.glCanvas.width = Math.round(r.width * dpr);
    this.glCanvas.height = Math.round(r.height * dpr);
    this.overlay.width = Math.round(this.cssWidth * dpr);
    this.overlay.height = Math.round(this.cssHeight * dpr);
    this.requestRender();
  }

  _bindPointBuffer(buffer) {
    const { gl, attr } = this;
    gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
    const bytes = STRIDE * 4;
    gl.enableVertexAttribArray(attr.a_pos);
    gl.vertexAttribPointer(attr.a_pos, 2, gl.FLOAT, false, bytes, 0);
    gl.enableVertexAttribArray(attr.a_index);
    gl.vertexAttribPointer(attr.a_index, 1, gl.FLOAT, false, bytes, 8);
    gl.enableVertexAttribArray(attr.a_cluster);
    gl.vertexAttribPointer(attr.a_cluster, 1, gl.FLOAT, false, bytes, 12);
  }

  _render() {
    const t0 = performance.now();
    this._adaptInterval(t0);
    this.renderPending = false;
    this.lastRender = t0;
    this.renders += 1;
    const before = this.uploaded;
    this._upload();
    const t1 = performance.now();
    if (this.autoscale) this._fit();
    const { gl, uni, view: v, dpr } = this;
    const n = this.uploaded;
    const store = this.store;
    // What the canvas holds is reused while nothing but new points changed: the view, the colour scale
    // and the marker size are fixed between full redraws, so new points are drawn on top of the old.
    const top = store && n ? colorTop(store.minIndex, store.maxIndex) : 0;
    const key = [v.x0, v.x1, v.y0, v.y1, this.colorMode, top, markerSize(n), this.refCount,
      this.glCanvas.width, this.glCanvas.height, store ? store.runId : ''].join('|');
    const full = key !== this.drawnKey || this.canvasCount > n;
    gl.viewport(0, 0, this.glCanvas.width, this.glCanvas.height);
    const sx = 2 / (v.x1 - v.x0);
    const sy = 2 / (v.y1 - v.y0);
    gl.uniform2f(uni.u_scale, sx, sy);
    gl.uniform2f(uni.u_offset, -1 - v.x0 * sx, -1 - v.y0 * sy);
    if (full) {
      this.fullRedraws += 1;
      this.drawnKey = key;
      this.canvasCount = 0;
      gl.clearColor(1, 1, 1, 1);
      gl.clear(gl.COLOR_BUFFER_BIT);
      if (this.refCount) {
        this._bindPointBuffer(this.refBuffer);
        gl.uniform1f(uni.u_mode, 2);
        gl.uniform4f(uni.u_color, 0.55, 0.57, 0.6, 0.35);
        gl.uniform1f(uni.u_size, 3.5 * dpr);
        gl.uniform1f(uni.u_points, 1);
        gl.drawArrays(gl.POINTS, 0, this.refCount);
      }
    }
    if (n > this.canvasCount) {
      this._bindPointBuffer(this.pointBuffer);
      gl.uniform1f(uni.u_mode, this.colorMode === 'cluster' ? 1 : 0);
      gl.uniform2f(uni.u_irange, store.minIndex, top);
      gl.uniform1f(uni.u_alpha, 0.85);
      gl.uniform1f(uni.u_size, markerSize(n) * dpr);
      gl.uniform1f(uni.u_points, 1);
      // A full redraw of a long run is spread over several frames, so no single frame blocks the main thread
      // (software GL fills ~1.4 us per point: 100,000 points in one go was a 140 ms long task).
      const upto = Math.min(n, this.canvasCount + MAX_POINTS_PER_FRAME);
      gl.drawArrays(gl.POINTS, this.canvasCount, upto - this.canvasCount);
      this.canvasCount = upto;
      if (upto < n) this.requestRender();
    }
    this.colorRange = [store && n ? store.minIndex : 0, top];
    const t2 = performance.now();
    this._drawOverlay();
    const t3 = performance.now();
    const ms = this.renderMs;
    ms.total += t3 - t0;
    ms.max = Math.max(ms.max, t3 - t0);
    ms.upload += t1 - t0;
    ms.overlay += t3 - t2;
    if (this.uploaded !== before) this.onDrawn();
  }

  _drawOverlay() {
    const ctx = this.overlay.getContext('2d');
    const { dpr } = this;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, this.cssWidth, this.cssHeight);
    const r = this._plotRect();
    const v = this.view;

    ctx.strokeStyle = '#9aa3ad';
    ctx.lineWidth = 1;
    ctx.strokeRect(r.left + 0.5, r.top + 0.5, r.width - 1, r.height - 1);
    ctx.fillStyle = '#3a4450';
    ctx.font = '12px system-ui, sans-serif';
    const xt = niceTicks(v.x0, v.x1, Math.max(2, Math.floor(r.width / 90)));
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (const t of xt.ticks) {
      const [px] = this.dataToScreen(t, 0);
      ctx.fillRect(px, r.top + r.height, 1, 5);
      ctx.fillText(t.toFixed(xt.decimals), px, r.top + r.height + 7);
    }
    const yt = niceTicks(v.y0, v.y1, Math.max(2, Math.floor(r.height / 60)));
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (const t of yt.ticks) {
      const [, py] = this.dataToScreen(0, t);
      ctx.fillRect(r.left - 5, py, 5, 1);
      ctx.fillText(t.toFixed(yt.decimals), r.left - 8, py);
    }
    ctx.font = '13px system-ui, sans-serif';
    ctx.textAlign = 'center';
    ctx.textBaseline = 'bottom';
    ctx.fillText('UMAP 1', r.left + r.width / 2, this.cssHeight - 2);
    ctx.save();
    ctx.translate(14, r.top + r.height / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textBaseline = 'middle';
    ctx.fillText('UMAP 2', 0, 0);
    ctx.restore();

    ctx.save();
    ctx.beginPath();
    ctx.rect(r.left, r.top, r.width, r.height);
    ctx.clip();
    const store = this.store;
    if (store && this.uploaded > 1) {
      // the faint trajectory through the most recent frames, in arrival order
      const d = store.data;
      const first = Math.max(0, this.uploaded - TRAJECTORY_LENGTH);
      ctx.strokeStyle = 'rgba(38, 51, 77, 0.3)';
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let i = first; i < this.uploaded; i += 1) {
        const [px, py] = this.dataToScreen(d[i * STRIDE], d[i * STRIDE + 1]);
        if (i === first) ctx.moveTo(px, py); else ctx.lineTo(px, py);
      }
      ctx.stroke();
    }
    if (store && this.uploaded) {
      const last = store.meta[this.uploaded - 1];
      const [lx, ly] = this.dataToScreen(last.x, last.y);
      ctx.strokeStyle = '#d62728';
      ctx.lineWidth = 2.5;
      ctx.beginPath();
      ctx.arc(lx, ly, 9, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.fillStyle = '#d62728';
      ctx.font = 'bold 12px system-ui, sans-serif';
      ctx.textAlign = 'left';
      ctx.textBaseline = 'bottom';
      ctx.strokeStyle = 'rgba(255, 255, 255, 0.9)'; // a halo keeps the label readable over dense points
      ctx.lineWidth = 3;
      ctx.strokeText(`#${last.index}`, lx + 11, ly - 6);
      ctx.fillText(`#${last.index}`, lx + 11, ly - 6);
    }
    if (store && this.picked >= 0 && this.picked < store.n) {
      const p = store.meta[this.picked];
      const [px, py] = this.dataToScreen(p.x, p.y);
      ctx.strokeStyle = '#111';
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(px, py, 7, 0, 2 * Math.PI);
      ctx.stroke();
    }
    const shape = this.drag && this.drag.shape ? this.drag.shape : this.selection;
    if (shape) {
      ctx.strokeStyle = '#1f77b4';
      ctx.fillStyle = 'rgba(31, 119, 180, 0.08)';
      ctx.setLineDash([5, 4]);
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      if (shape.type === 'box') {
        const [ax, ay] = this.dataToScreen(shape.x0, shape.y1);
        const [bx, by] = this.dataToScreen(shape.x1, shape.y0);
        ctx.rect(ax, ay, bx - ax, by - ay);
      } else {
        shape.points.forEach(([x, y], i) => {
          const [px, py] = this.dataToScreen(x, y);
          if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
        });
        ctx.closePath();
      }
      ctx.fill();
      ctx.stroke();
    }
    ctx.restore();
  }

  // ---- interaction ---------------------------------------------------------------------------------

  _bindEvents() {
    const el = this.overlay;
    const local = (e) => {
      const rect = el.getBoundingClientRect();
      return [e.clientX - rect.left, e.clientY - rect.top];
    };
    el.addEventListener('pointerdown', (e) => {
      if (e.button !== 0) return;
      el.setPointerCapture(e.pointerId);
      const [px, py] = local(e);
      this.drag = { start: [px, py], last: [px, py], moved: false, path: [this.screenToData(px, py)], shape: null };
    });
    el.addEventListener('pointermove', (e) => {
      const drag = this.drag;
      if (!drag) return;
      const [px, py] = local(e);
      if (!drag.moved && Math.hypot(px - drag.start[0], py - drag.start[1]) < CLICK_SLOP_PX) return;
      drag.moved = true;
      if (this.mode === 'pan') {
        const r = this._plotRect();
        const v = this.view;
        const dx = ((px - drag.last[0]) / r.width) * (v.x1 - v.x0);
        const dy = ((py - drag.last[1]) / r.height) * (v.y1 - v.y0);
        this.view = { x0: v.x0 - dx, x1: v.x1 - dx, y0: v.y0 + dy, y1: v.y1 + dy };
        this.autoscale = false;
      } else if (this.mode === 'box') {
        const [ax, ay] = this.screenToData(...drag.start);
        const [bx, by] = this.screenToData(px, py);
        drag.shape = { type: 'box', x0: Math.min(ax, bx), x1: Math.max(ax, bx), y0: Math.min(ay, by), y1: Math.max(ay, by) };
      } else {
        drag.path.push(this.screenToData(px, py));
        const xs = drag.path.map((p) => p[0]);
        const ys = drag.path.map((p) => p[1]);
        drag.shape = { type: 'lasso', points: drag.path, x0: Math.min(...xs), x1: Math.max(...xs), y0: Math.min(...ys), y1: Math.max(...ys) };
      }
      drag.last = [px, py];
      this.requestRender();
    });
    const finish = (e) => {
      const drag = this.drag;
      this.drag = null;
      if (!drag) return;
      if (!drag.moved) {
        const slot = this.pick(...local(e));
        if (slot >= 0) {
          this.setPicked(slot);
          this.onPick(slot);
        } else {
          const ref = this.pickReference(...local(e)); // run points win: they are drawn on top
          if (ref >= 0) this.onPickReference(ref);
        }
        return;
      }
      if (drag.shape && (drag.shape.type === 'box' || drag.shape.points.length > 2)) {
        this.selection = drag.shape;
        this.onSelect(this._select(drag.shape), drag.shape);
      }
      this.requestRender();
    };
    el.addEventListener('pointerup', finish);
    el.addEventListener('pointercancel', () => { this.drag = null; this.requestRender(); });
    el.addEventListener('wheel', (e) => {
      e.preventDefault();
      const [px, py] = local(e);
      const [cx, cy] = this.screenToData(px, py);
      const f = Math.exp(Math.max(-100, Math.min(100, e.deltaY)) * 0.002);
      const v = this.view;
      this.view = { x0: cx + (v.x0 - cx) * f, x1: cx + (v.x1 - cx) * f, y0: cy + (v.y0 - cy) * f, y1: cy + (v.y1 - cy) * f };
      this.autoscale = false;
      this.requestRender();
    }, { passive: false });
    el.addEventListener('dblclick', () => this.resetView());
  }
}
