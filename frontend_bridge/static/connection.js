// The /ws connection: reconnects on its own with capped, jittered exponential backoff. The service sends the
// current run's points first on every connect (backfill), so a reconnect needs no bookkeeping here beyond
// telling the page when a backfill starts and ends; the run store drops the points it already holds.

const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 10000;

export class Connection {
  /**
   * @param {string} url  ws:// or wss:// URL of /ws
   * @param {{onMessage: (msg: object) => void, onState: (state: object) => void}} handlers
   */
  constructor(url, { onMessage, onState }) {
    this.url = url;
    this.onMessage = onMessage;
    this.onState = onState;
    this.ws = null;
    this.attempt = 0;
    this.connects = 0; // successful opens, the first one included
    this.retryTimer = null;
    this.stopped = false;
    this.state = { status: 'connecting', attempt: 0, retryAt: null, detail: '' };
    this.badMessages = 0;
  }

  start() {
    this.stopped = false;
    this._open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000, 'page closed');
  }

  _setState(patch) {
    this.state = { ...this.state, ...patch };
    this.onState(this.state);
  }

  _open() {
    this._setState({ status: this.connects ? 'reconnecting' : 'connecting', retryAt: null });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._scheduleRetry(String(err));
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.connects += 1;
      this._setState({ status: 'open', attempt: 0, detail: '' });
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== 'string') return; // the page asks for JSON; binary frames are not for it
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        this.badMessages += 1;
        return;
      }
      if (msg.type === 'backfill_start') this._setState({ status: 'backfilling' });
      this.onMessage(msg);
      if (msg.type === 'backfill_end') this._setState({ status: 'open' });
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) {
        this._setState({ status: 'closed', detail: '' });
        return;
      }
      // 1008: the token was refused; retrying at full speed would not help, but the operator may fix it.
      const detail = event.code === 1008 ? 'token refused' : `closed (${event.code}${event.reason ? `: ${event.reason}` : ''})`;
      this._scheduleRetry(detail);
    };
  }

  _scheduleRetry(detail) {
    this.attempt += 1;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (this.attempt - 1));
    const delay = base / 2 + Math.random() * (base / 2);
    this._setState({ status: 'waiting', attempt: this.attempt, retryAt: Date.now() + delay, detail });
    this.retryTimer = setTimeout(() => this._open(), delay);
  }

  /** Try now instead of waiting out the backoff (the status badge's "retry" button). */
  retryNow() {
    if (this.ws || this.stopped) return;
    clearTimeout(this.retryTimer);
    this._open();
  }
}
