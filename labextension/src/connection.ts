import { ISessionContext } from '@jupyterlab/apputils';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { UUID } from '@lumino/coreutils';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import {
  FrontendMessage,
  IDepartedWorker,
  IEventBrief,
  IPoolStatus,
  IResultMessage,
  KernelMessage as DspoolMessage,
  TARGET_NAME
} from './protocol';

/** How long a command waits for the kernel's answer, in milliseconds. */
const COMMAND_TIMEOUT_MS = 60_000;

/**
 * How often to say hello on the comm (ms): the kernel stops following the pool when
 * it heard nothing for its LEASE (90 s), so a closed tab costs the kernel nothing.
 */
const KEEPALIVE_MS = 30_000;

/**
 * How long a departed worker stays listed, in seconds: the kernel's
 * `dspool_jupyter.status.DEPARTED_SECONDS` (the status widget keeps it as long).
 */
export const DEPARTED_SECONDS = 15;

/** At most one comm of our own per this many ms after someone else closed ours. */
const REOPEN_INTERVAL_MS = 5_000;

interface IPending {
  resolve: () => void;
  reject: (reason: Error) => void;
  timer: number;
}

/**
 * The pool of one notebook's kernel, as seen over the `dspool` comm.
 *
 * Follows the notebook's kernel: a kernel change or restart drops the comm (the
 * status becomes `null`), and the new kernel's announcement or an existing comm
 * found through `comm_info` brings it back.
 */
export class PoolConnection implements IDisposable {
  constructor(sessionContext: ISessionContext) {
    sessionContext.kernelChanged.connect(this._onKernelChanged, this);
    this._attach(sessionContext.session?.kernel ?? null);
  }

  /** Emitted whenever the status or the connection changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The last snapshot, or `null` when the kernel has no pool (or no dspool). */
  get status(): IPoolStatus | null {
    return this._status;
  }

  /** Workers that left the pool recently (the kernel keeps them 15 s, as the widget does). */
  get departed(): IDepartedWorker[] {
    const now = Date.now();
    return this._departed.filter(d => d.until > now);
  }

  /** When (page ms) the next departed worker stops being listed, or null. */
  get nextDepartureExpiry(): number | null {
    const now = Date.now();
    const left = this._departed.map(d => d.until).filter(t => t > now);
    return left.length ? Math.min(...left) : null;
  }

  /** The urgent events folded into the last snapshot. */
  get lastEvents(): IEventBrief[] {
    return this._lastEvents;
  }

  /** Kernel clock minus this page's clock, in seconds (to age heartbeats). */
  get clockOffset(): number {
    return this._clockOffset;
  }

  /** Sequence number of the last snapshot (0 before the first). */
  get seq(): number {
    return this._seq;
  }

  /** True while a dspool comm with the kernel is open. */
  get connected(): boolean {
    return this._comm !== null && !this._comm.isDisposed;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  /** Ask the kernel for a fresh snapshot (no-op when not connected). */
  refresh(): void {
    this._send({ type: 'refresh' });
  }

  /** Kill a worker and let the pool start a replacement. */
  restartWorker(workerId: string): Promise<void> {
    return this._request(request_id => ({
      type: 'restart_worker',
      worker_id: workerId,
      request_id
    }));
  }

  /** Replace every worker of the pool. */
  restartPool(): Promise<void> {
    return this._request(request_id => ({ type: 'restart_pool', request_id }));
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    const comm = this._comm;
    const own = this._ownComm;
    this._detach();
    if (comm && own && !comm.isDisposed) {
      // ours alone: tell the kernel to stop serving it (the shared one stays open)
      comm.close({ type: 'bye' });
    }
    Signal.clearData(this);
  }

  private _onKernelChanged(
    _sender: ISessionContext,
    args: { newValue: Kernel.IKernelConnection | null }
  ): void {
    this._detach();
    this._attach(args.newValue);
  }

  private _attach(kernel: Kernel.IKernelConnection | null): void {
    this._kernel = kernel;
    if (!kernel) {
      return;
    }
    kernel.registerCommTarget(TARGET_NAME, this._onCommOpen);
    kernel.statusChanged.connect(this._onKernelStatus, this);
    void this._discover(kernel);
  }

  private _detach(): void {
    const kernel = this._kernel;
    this._kernel = null;
    if (kernel && !kernel.isDisposed) {
      kernel.removeCommTarget(TARGET_NAME, this._onCommOpen);
      kernel.statusChanged.disconnect(this._onKernelStatus, this);
    }
    this._dropComm();
  }

  /** Adopt a comm the kernel already has open (page reload, notebook reopened). */
  private async _discover(kernel: Kernel.IKernelConnection): Promise<void> {
    try {
      await kernel.info;
      if (kernel !== this._kernel || this.connected) {
        return;
      }
      const reply = await kernel.requestCommInfo({ target_name: TARGET_NAME });
      if (kernel !== this._kernel || this.connected) {
        return;
      }
      const content = reply.content;
      if (content.status !== 'ok') {
        return;
      }
      const ids = Object.keys(content.comms).filter(
        id => content.comms[id].target_name === TARGET_NAME
      );
      const id = ids.find(i => !kernel.hasComm(i)) ?? null;
      if (id !== null) {
        this._adopt(kernel.createComm(TARGET_NAME, id), false);
      }
    } catch (reason) {
      // The kernel went away or restarted while we asked: its announcement will come.
      console.debug('dspool: comm discovery failed', reason);
    }
  }

  private _onCommOpen = (
    comm: Kernel.IComm,
    _msg: KernelMessage.ICommOpenMsg
  ): void => {
    if (this.connected) {
      return; // another announcement; keep the comm we have
    }
    this._adopt(comm, false);
  };

  private _adopt(comm: Kernel.IComm, own: boolean): void {
    this._comm = comm;
    this._ownComm = own;
    comm.onMsg = msg => this._onMessage(msg.content.data as unknown);
    comm.onClose = msg => {
      if (this._comm !== comm) {
        return;
      }
      const data = msg.content.data as { type?: string } | undefined;
      this._dropComm();
      if (data?.type !== 'bye') {
        this._reopen();
      }
    };
    this._send({ type: 'refresh' }); // live now, and a snapshot for this page at once
    window.clearInterval(this._keepalive);
    this._keepalive = window.setInterval(() => {
      this._send({ type: 'hello' });
    }, KEEPALIVE_MS);
    this._changed.emit();
  }

  /** Someone else closed our comm (not the kernel's "bye"): open one of our own. */
  private _reopen(): void {
    const kernel = this._kernel;
    const now = Date.now();
    if (
      !kernel ||
      kernel.isDisposed ||
      now - this._lastReopen < REOPEN_INTERVAL_MS
    ) {
      return;
    }
    this._lastReopen = now;
    try {
      const comm = kernel.createComm(TARGET_NAME);
      comm.open({ type: 'hello' });
      this._adopt(comm, true);
    } catch (reason) {
      console.debug('dspool: could not open a comm', reason);
    }
  }

  private _dropComm(): void {
    this._comm = null;
    this._ownComm = false;
    window.clearInterval(this._keepalive);
    for (const pending of this._pending.values()) {
      window.clearTimeout(pending.timer);
      pending.reject(new Error('the kernel connection closed'));
    }
    this._pending.clear();
    this._departed = [];
    this._setStatus(null, [], 0);
  }

  private _onKernelStatus(
    _kernel: Kernel.IKernelConnection,
    status: Kernel.Status
  ): void {
    if (
      status === 'restarting' ||
      status === 'autorestarting' ||
      status === 'dead'
    ) {
      this._dropComm();
    }
  }

  private _onMessage(data: unknown): void {
    if (typeof data !== 'object' || data === null || !('type' in data)) {
      return;
    }
    const msg = data as DspoolMessage;
    switch (msg.type) {
      case 'status':
        this._seq = msg.seq;
        this._departed = (msg.status ? (msg.departed ?? []) : []).map(d => ({
          ...d,
          until: Date.now() + (DEPARTED_SECONDS - d.age) * 1000
        }));
        this._setStatus(msg.status, msg.events ?? [], msg.time);
        break;
      case 'result':
        this._onResult(msg);
        break;
      default:
        break;
    }
  }

  private _onResult(msg: IResultMessage): void {
    const pending = msg.request_id ? this._pending.get(msg.request_id) : null;
    if (!pending || !msg.request_id) {
      return;
    }
    this._pending.delete(msg.request_id);
    window.clearTimeout(pending.timer);
    if (msg.ok) {
      pending.resolve();
    } else {
      pending.reject(new Error(msg.error ?? 'the command failed'));
    }
  }

  private _setStatus(
    status: IPoolStatus | null,
    events: IEventBrief[],
    kernelTime: number
  ): void {
    if (status === null && this._status === null && events.length === 0) {
      return;
    }
    this._status = status;
    this._lastEvents = events;
    if (kernelTime > 0) {
      this._clockOffset = kernelTime - Date.now() / 1000;
    }
    this._changed.emit();
  }

  private _send(msg: FrontendMessage): boolean {
    const comm = this._comm;
    if (!comm || comm.isDisposed) {
      return false;
    }
    comm.send(msg as unknown as KernelMessage.ICommMsgMsg['content']['data']);
    return true;
  }

  private _request(
    build: (requestId: string) => FrontendMessage
  ): Promise<void> {
    const requestId = UUID.uuid4();
    return new Promise<void>((resolve, reject) => {
      if (!this._send(build(requestId))) {
        reject(new Error('no dspool pool connection'));
        return;
      }
      const timer = window.setTimeout(() => {
        this._pending.delete(requestId);
        reject(new Error('the kernel did not answer in time'));
      }, COMMAND_TIMEOUT_MS);
      this._pending.set(requestId, { resolve, reject, timer });
    });
  }

  private _kernel: Kernel.IKernelConnection | null = null;
  private _comm: Kernel.IComm | null = null;
  private _ownComm = false;
  private _keepalive = 0;
  private _lastReopen = 0;
  private _status: IPoolStatus | null = null;
  private _lastEvents: IEventBrief[] = [];
  private _departed: (IDepartedWorker & { until: number })[] = [];
  private _clockOffset = 0;
  private _seq = 0;
  private _pending = new Map<string, IPending>();
  private _changed = new Signal<this, void>(this);
  private _isDisposed = false;
}
