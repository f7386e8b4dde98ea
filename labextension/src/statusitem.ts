import { Widget } from '@lumino/widgets';

import { busyCount, summaryHead } from './format';

/** How long the failed count stays highlighted after it rose (ms). */
const FAILURE_HIGHLIGHT_MS = 8000;
import { ActivePoolModel } from './model';

/**
 * The status bar item: `dspool ready/target · busy · failed`, coloured by state.
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
    this._text.append(this._head, this._failed);
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
    for (const state of STATES) {
      node.classList.toggle(`dspool-state-${state}`, status?.state === state);
    }
    if (!status) {
      node.dataset.state = 'none';
      this._head.data = '';
      this._failed.textContent = '';
      node.title = '';
      delete node.dataset.failed;
      return;
    }
    const failedNow =
      status.failed > Number(node.dataset.failed ?? status.failed);
    node.dataset.state = status.state;
    node.dataset.ready = String(status.ready_count);
    node.dataset.target = String(status.target);
    node.dataset.busy = String(busyCount(status));
    node.dataset.failed = String(status.failed);
    node.dataset.replaced = String(status.replaced);
    node.dataset.seq = String(this._model.current?.seq ?? 0);
    node.dataset.updatedAt = String(Date.now());
    this._head.data = summaryHead(status);
    this._failed.textContent = `${status.failed} failed`;
    node.title =
      `dspool pool: ${status.state}; ${status.ready_count} of ${status.target} ` +
      `workers ready, ${status.queued} queued, ${status.calls} calls, ` +
      `${status.failed} failed, ${status.replaced} workers replaced. ` +
      'Click to open the pool panel.';
    if (failedNow) {
      node.classList.add('dspool-recent-failure');
      window.clearTimeout(this._highlightTimer);
      this._highlightTimer = window.setTimeout(() => {
        node.classList.remove('dspool-recent-failure');
      }, FAILURE_HIGHLIGHT_MS);
    }
  }

  dispose(): void {
    window.clearTimeout(this._highlightTimer);
    super.dispose();
  }

  private _model: ActivePoolModel;
  private _dot: HTMLElement;
  private _text: HTMLElement;
  private _head: Text;
  private _failed: HTMLElement;
  private _highlightTimer = 0;
}

const STATES = ['starting', 'healthy', 'degraded', 'closed'];
