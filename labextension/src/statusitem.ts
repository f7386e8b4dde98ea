import { Widget } from '@lumino/widgets';

import { deaths, slotCount, summaryHead } from './format';
import { ActivePoolModel } from './model';

/** How long the failed count stays highlighted after it rose (ms). */
const FAILURE_HIGHLIGHT_MS = 8000;

/**
 * The status bar item: `dspool ready/target · in flight/slots · queued · failed`,
 * coloured by state, with `· N died` while a worker that died is still listed (the
 * 15 s the status widget and the panel keep it).
 *
 * Its `data-*` attributes carry the numbers (tests and the latency script read them).
 */
export class PoolStatusItem extends Widget {
  constructor(model: ActivePoolModel, onClick: () => void) {
    super();
    this._model = model;
    this.addClass('dspool-status-item');
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this._dot = document.createElement('span');
    this._dot.className = 'dspool-status-dot';
    this._text = document.createElement('span');
    this._text.className = 'dspool-status-text';
    this._head = document.createTextNode('');
    this._failed = document.createElement('span');
    this._failed.className = 'dspool-status-failed';
    this._died = document.createElement('span');
    this._died.className = 'dspool-status-died';
    this._text.append(this._head, this._failed, this._died);
    this.node.append(this._dot, this._text);
    this.node.addEventListener('click', onClick);
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        onClick();
      }
    });
    model.changed.connect(this._render, this);
    this._render();
  }

  private _render(): void {
    const status = this._model.status;
    const node = this.node;
    window.clearTimeout(this._expiryTimer);
    for (const state of STATES) {
      node.classList.toggle(`dspool-state-${state}`, status?.state === state);
    }
    if (!status) {
      node.dataset.state = 'none';
      this._head.data = '';
      this._failed.textContent = '';
      this._died.textContent = '';
      node.title = '';
      delete node.dataset.failed;
      return;
    }
    const failedNow =
      status.failed > Number(node.dataset.failed ?? status.failed);
    const died = deaths(this._model.departed);
    node.dataset.state = status.state;
    node.dataset.ready = String(status.ready_count);
    node.dataset.target = String(status.target);
    node.dataset.running = String(status.running);
    node.dataset.slots = String(slotCount(status));
    node.dataset.queued = String(status.queued);
    node.dataset.failed = String(status.failed);
    node.dataset.replaced = String(status.replaced);
    node.dataset.died = String(died.length);
    node.dataset.seq = String(this._model.current?.seq ?? 0);
    node.dataset.updatedAt = String(Date.now());
    this._head.data = summaryHead(status);
    this._failed.textContent = `${status.failed} failed`;
    this._died.textContent = died.length ? ` · ${died.length} died` : '';
    const deathNotes = died.map(d => `${d.id} ${d.note}`).join(', ');
    node.title =
      `dspool pool: ${status.state}; ${status.ready_count} of ${status.target} ` +
      `workers ready, ${status.running} of ${slotCount(status)} slots in flight, ` +
      `${status.queued} queued; ${status.calls} calls ended: ` +
      `${status.done ?? 0} done, ${status.failed} failed, ` +
      `${status.cancelled ?? 0} cancelled; ${status.replaced} workers replaced` +
      (deathNotes ? ` (just now: ${deathNotes})` : '') +
      '. Click to open the pool panel.';
    if (failedNow) {
      node.classList.add('dspool-recent-failure');
      window.clearTimeout(this._highlightTimer);
      this._highlightTimer = window.setTimeout(() => {
        node.classList.remove('dspool-recent-failure');
      }, FAILURE_HIGHLIGHT_MS);
    }
    const expiry = this._model.current?.nextDepartureExpiry ?? null;
    if (expiry !== null) {
      this._expiryTimer = window.setTimeout(
        () => this._render(),
        Math.max(0, expiry - Date.now()) + 50
      );
    }
  }

  dispose(): void {
    window.clearTimeout(this._highlightTimer);
    window.clearTimeout(this._expiryTimer);
    super.dispose();
  }

  private _model: ActivePoolModel;
  private _dot: HTMLElement;
  private _text: HTMLElement;
  private _head: Text;
  private _failed: HTMLElement;
  private _died: HTMLElement;
  private _highlightTimer = 0;
  private _expiryTimer = 0;
}

const STATES = ['starting', 'healthy', 'degraded', 'closed'];
