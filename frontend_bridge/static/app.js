// The live page: wires the /ws stream into per-run stores, the WebGL plot and the side panels.

import { wsUrl } from './api.js';
import { viridisGradientCss } from './colors.js';
import { Connection } from './connection.js';
import {
  ClusterLegend, FramePanel, HealthPanel, Notices, SelectionPanel, fetchReference, fetchRunPoints, fetchRuns,
} from './panels.js';
import { ScatterPlot, TRAJECTORY_LENGTH } from './plot.js';
import { RunStore, STRIDE, pointFromMessage, pointFromRow } from './store.js';

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);

class LivePage {
  constructor() {
    this.stores = new Map(); // run id -> RunStore (runs seen live, or loaded from the service)
    this.liveRunId = null; // the run the service is streaming (or last streamed)
    this.viewing = 'live'; // 'live' or a past run id
    this.paused = false;
    this.inBackfill = false;
    this.backfills = []; // backfill_end events, for the status line and the test hooks
    this.badPoints = 0;
    this.clusterUpdates = 0; // cluster_update messages applied
    this.uiPending = false;
    this.runs = [];

    this.plot = new ScatterPlot($('plot'), {
      onPick: (slot) => this.framePanel.show(this.plot.store.meta[slot]),
      onSelect: (slots) => this.selectionPanel.show(slots.map((s) => this.plot.store.meta[s])),
      onDrawn: () => this.scheduleUi(),
      onPickReference: (i) => {
        if (this.reference && this.reference.frames) {
          this.framePanel.showReference(i, this.reference.x[i], this.reference.y[i], this.reference.cluster?.[i]);
        }
      },
    });
    this.framePanel = new FramePanel($('frame-panel'));
    this.selectionPanel = new SelectionPanel($('selection-panel'));
    this.selectionPanel.clear();
    this.legend = new ClusterLegend($('legend'));
    this.legend.update(new Map());
    this.notices = new Notices($('notices'));
    this.health = new HealthPanel($('health'));
    this.connection = new Connection(wsUrl('ws'), {
      onMessage: (msg) => this.onMessage(msg),
      onState: (state) => this.renderConnection(state),
    });
    $('colorbar-gradient').style.background = viridisGradientCss();
    $('trajectory-note').textContent = `line: last ${TRAJECTORY_LENGTH.toLocaleString()} frames`;
    this.bindControls();
  }

  start() {
    this.connection.start();
    this.health.start();
    this.loadReference();
    this.refreshRuns();
    setInterval(() => this.renderConnection(this.connection.state), 1000); // the retry countdown
  }

  // ---- the stream ----------------------------------------------------------------------------------

  store(runId, name = '') {
    let s = this.stores.get(runId);
    if (!s) {
      s = new RunStore(runId, { name });
      this.stores.set(runId, s);
    }
    if (name && !s.name) s.name = name;
    return s;
  }

  onMessage(msg) {
    switch (msg.type) {
      case 'point': return this.onPoint(msg);
      case 'run_start': return this.onRunStart(msg);
      case 'run_stop': return this.onRunStop(msg);
      case 'cluster_new': return this.onClusterNew(msg);
      case 'cluster_update': return this.onClusterUpdate(msg);
      case 'backfill_start':
        this.inBackfill = true;
        return this.scheduleUi();
      case 'backfill_end':
        this.inBackfill = false;
        this.backfills.push({ ...msg, at: Date.now() });
        return this.scheduleUi();
      default: return undefined; // newer servers may send more event types; ignore what we do not know
    }
  }

  onPoint(msg) {
    let p;
    try {
      p = pointFromMessage(msg);
    } catch (err) {
      this.badPoints += 1;
      console.warn('ignoring a point message:', err.message);
      return;
    }
    const s = this.store(p.runId);
    if (!this.liveRunId) this.liveRunId = p.runId;
    if (!this.plot.store && this.viewing === 'live' && p.runId === this.liveRunId) this.showStore(s);
    if (s.add(p) && this.plot.store === s) this.plot.pointsAdded();
    this.scheduleUi();
  }

  onRunStart(msg) {
    const known = this.stores.has(msg.run_id);
    const s = this.store(msg.run_id, msg.run_name);
    s.live = true;
    s.stopped = null;
    this.liveRunId = msg.run_id;
    if (this.viewing === 'live' && !this.paused && this.plot.store !== s) this.showStore(s);
    if (!known && !this.inBackfill) this.notices.push(`Run ${msg.run_name || msg.run_id} started`, 'info');
    this.refreshRuns();
    this.scheduleUi();
  }

  onRunStop(msg) {
    const s = this.store(msg.run_id);
    const wasLive = s.live;
    s.live = false;
    s.stopped = msg;
    if (wasLive && !this.inBackfill) {
      this.notices.push(`Run ${s.name || msg.run_id} stopped after ${msg.processed} frames (${msg.reason})`, 'info');
    }
    this.refreshRuns();
    this.scheduleUi();
  }

  onClusterNew(msg) {
    const s = this.store(msg.run_id);
    s.knownClusters = s.knownClusters || new Set();
    if (s.knownClusters.has(msg.cluster)) return; // re-sent on reconnect
    s.knownClusters.add(msg.cluster);
    if (!this.inBackfill) {
      this.notices.push(`New cluster ${msg.cluster} appeared at frame #${msg.index}`, 'cluster');
      this.pendingFlash = msg.cluster;
    }
    this.scheduleUi();
  }

  /** Re-clustering corrected the ids of points already received: recolour them where they are held. */
  onClusterUpdate(msg) {
    if (!Array.isArray(msg.indices) || !Array.isArray(msg.clusters)) return;
    const s = this.stores.get(msg.run_id);
    if (!s) return;
    const first = s.recolour(msg.indices, msg.clusters);
    this.clusterUpdates += 1;
    if (first !== Infinity && this.plot.store === s) this.plot.pointsRecoloured(first);
    this.scheduleUi();
  }

  // ---- views ---------------------------------------------------------------------------------------

  showStore(s) {
    this.plot.show(s);
    this.selectionPanel.clear();
    this.scheduleUi();
  }

  async selectRun(value) {
    this.viewing = value;
    if (value === 'live') {
      const s = this.liveRunId ? this.store(this.liveRunId) : null;
      if (s) this.showStore(s);
      return;
    }
    let s = this.stores.get(value);
    const complete = s && s.stopped && s.n >= s.stopped.processed;
    if (!complete) {
      $('run-status').textContent = `Loading run ${value}…`;
      try {
        const rows = await fetchRunPoints(value);
        const run = this.runs.find((r) => runValue(r) === value);
        const loaded = new RunStore(value, { name: run ? run.run_name : '' });
        for (const r of rows) loaded.add(pointFromRow(value, r));
        loaded.stopped = s ? s.stopped : { processed: loaded.n };
        if (!s || loaded.n >= s.n) {
          s = loaded;
          this.stores.set(value, s);
        }
      } catch (err) {
        this.notices.push(`Could not load run ${value}: ${err.message}`, 'error');
        if (!s) return;
      }
    }
    if (this.viewing === value) this.showStore(s);
  }

  async refreshRuns() {
    try {
      this.runs = await fetchRuns();
    } catch (err) {
      return; // the service may be restarting; the next run event retries
    }
    const select = $('run-select');
    const live = this.liveRunId ? this.stores.get(this.liveRunId) : null;
    const liveLabel = live ? `Live: ${live.name || live.runId}` : 'Live (waiting for a run)';
    const options = [new Option(liveLabel, 'live')];
    for (const r of this.runs) {
      if (r.run_id === this.liveRunId) continue;
      const when = r.started_at ? new Date(r.started_at * 1000).toLocaleString() : '';
      options.push(new Option(`${r.run_name || r.run_id} · ${r.num_points ?? '?'} pts · ${when}`, runValue(r)));
    }
    select.replaceChildren(...options);
    select.value = this.viewing;
    if (select.value !== this.viewing) select.value = 'live';
  }

  async loadReference() {
    try {
      const ref = await fetchReference();
      const xs = ref.x ?? (ref.points || []).map((p) => p[0]);
      const ys = ref.y ?? (ref.points || []).map((p) => p[1]);
      this.plot.setReference(xs, ys);
      this.reference = { x: xs, y: ys, cluster: ref.cluster, frames: Boolean(ref.frames) };
      $('reference-note').hidden = !xs.length;
    } catch (err) {
      $('reference-note').hidden = true; // no reference map: the run still plots
    }
  }

  // ---- controls and status -------------------------------------------------------------------------

  bindControls() {
    $('pause').addEventListener('click', () => this.setPaused(!this.paused));
    $('reset-view').addEventListener('click', () => this.plot.resetView());
    $('color-by').addEventListener('change', (e) => {
      this.plot.setColorMode(e.target.value);
      $('colorbar').hidden = e.target.value !== 'index';
    });
    $('run-select').addEventListener('change', (e) => this.selectRun(e.target.value));
    for (const mode of ['pan', 'box', 'lasso']) {
      $(`tool-${mode}`).addEventListener('click', () => this.setTool(mode));
    }
    $('clear-selection').addEventListener('click', () => {
      this.plot.clearSelection();
      this.selectionPanel.clear();
    });
    $('connection-status').addEventListener('click', () => this.connection.retryNow());
    this.setTool('pan');
  }

  setTool(mode) {
    this.plot.setMode(mode);
    for (const m of ['pan', 'box', 'lasso']) $(`tool-${m}`).setAttribute('aria-pressed', String(m === mode));
  }

  setPaused(paused) {
    this.paused = paused;
    this.plot.setFrozen(paused);
    $('pause').textContent = paused ? 'Resume' : 'Pause';
    $('pause').setAttribute('aria-pressed', String(paused));
    if (!paused && this.viewing === 'live' && this.liveRunId && this.plot.store !== this.stores.get(this.liveRunId)) {
      this.showStore(this.store(this.liveRunId));
    }
    this.scheduleUi();
  }

  renderConnection(state) {
    const badge = $('connection-status');
    badge.dataset.state = state.status;
    const labels = {
      connecting: 'Connecting…',
      open: 'Live',
      backfilling: 'Catching up…',
      reconnecting: 'Reconnecting…',
      waiting: `Disconnected, retry in ${Math.max(0, Math.ceil(((state.retryAt || 0) - Date.now()) / 1000))} s`,
      closed: 'Closed',
    };
    badge.textContent = labels[state.status] || state.status;
    badge.title = state.status === 'waiting' ? `${state.detail}; attempt ${state.attempt}. Click to retry now.` : '';
  }

  /** DOM updates at most once per animation frame, however many messages arrived. */
  scheduleUi() {
    if (this.uiPending) return;
    this.uiPending = true;
    requestAnimationFrame(() => {
      this.uiPending = false;
      this.renderUi();
    });
  }

  renderUi() {
    const s = this.plot.store;
    const drawn = this.plot.drawnCount();
    $('point-count').textContent = drawn.toLocaleString();
    $('point-count').dataset.count = String(drawn);
    const waiting = s ? s.n - drawn : 0;
    $('paused-note').hidden = !this.paused;
    $('paused-note').textContent = `Paused: ${waiting.toLocaleString()} new point${waiting === 1 ? '' : 's'} waiting`;
    if (s) {
      const live = s.live ? 'streaming' : s.stopped ? `stopped (${s.stopped.processed ?? s.n} frames)` : 'finished';
      const title = s.name || s.runId;
      $('run-status').textContent = `${title}: ${live}`;
      // the scale's top is rounded up (so drawn points keep their colour as the run grows)
      const [lo, hi] = this.plot.colorRange;
      $('colorbar-min').textContent = s.n ? `#${lo.toLocaleString()}` : '';
      $('colorbar-max').textContent = s.n ? `#${hi.toLocaleString()}` : '';
      if (!this.paused) this.legend.update(s.clusterCounts);
    } else {
      $('run-status').textContent = 'Waiting for a run…';
    }
    if (this.pendingFlash !== undefined) {
      this.legend.flash(this.pendingFlash);
      this.pendingFlash = undefined;
    }
    const last = this.backfills[this.backfills.length - 1];
    $('backfill-note').textContent = last
      ? `last catch-up: ${last.count.toLocaleString()} points${last.skipped ? `, ${last.skipped} no longer held` : ''}`
      : '';
  }

  /** Stable hooks for tests and for the benchmark; nothing here scrapes the canvas. */
  hooks() {
    const page = this;
    return {
      pointCount: () => page.plot.drawnCount(),
      runId: () => (page.plot.store ? page.plot.store.runId : null),
      liveRunId: () => page.liveRunId,
      connection: () => page.connection.state.status,
      connects: () => page.connection.connects,
      backfills: () => page.backfills.map((b) => ({ ...b })),
      renders: () => page.plot.renders,
      renderMs: () => ({ ...page.plot.renderMs }),
      fullRedraws: () => page.plot.fullRedraws,
      duplicatesDropped: () => (page.plot.store ? page.plot.store.duplicates : 0),
      clusterUpdates: () => page.clusterUpdates,
      /** A frame's cluster id as the shown run holds it now, or null. */
      pointCluster: (frameIndex) => {
        const s = page.plot.store;
        const slot = s ? s.slotByIndex.get(frameIndex) : undefined;
        return slot === undefined ? null : s.data[slot * STRIDE + 3];
      },
      recolourPending: () => page.plot.recolourPending(),
      /** Viewport coordinates of a frame's point in the shown run, or null when it is not drawn. */
      pointClientPosition: (frameIndex) => {
        const s = page.plot.store;
        const slot = s ? s.slotByIndex.get(frameIndex) : undefined;
        if (slot === undefined || slot >= page.plot.drawnCount()) return null;
        const p = s.meta[slot];
        const [x, y] = page.plot.dataToScreen(p.x, p.y);
        const rect = page.plot.overlay.getBoundingClientRect();
        return { x: rect.left + x, y: rect.top + y };
      },
      /** Viewport coordinates of a data-space position (for drawing a selection box). */
      dataToClient: (x, y) => {
        const [px, py] = page.plot.dataToScreen(x, y);
        const rect = page.plot.overlay.getBoundingClientRect();
        return { x: rect.left + px, y: rect.top + py };
      },
      /** Viewport coordinates of reference point i, or null when there is no such point. */
      referenceClientPosition: (i) => {
        const r = page.reference;
        if (!r || !(i >= 0 && i < r.x.length)) return null;
        const [x, y] = page.plot.dataToScreen(r.x[i], r.y[i]);
        const rect = page.plot.overlay.getBoundingClientRect();
        return { x: rect.left + x, y: rect.top + y };
      },
      dataBounds: () => (page.plot.store ? { ...page.plot.store.bounds } : null),
      selectedCount: () => page.selectionPanel.count,
    };
  }
}

const page = new LivePage();
window.latentStream = page.hooks();
page.start();

/** A past run's choice in the run list: its storage key, which tells two runs with the same run id apart. */
function runValue(run) {
  return run.run_key || run.run_id;
}
