import { Widget } from '@lumino/widgets';

import { PoolConnection } from './connection';
import { deaths, slotCount } from './format';

/**
 * The notebook toolbar item: a coloured dot and `dspool 2/2 · 0 queued`, or
 * `dspool: no pool`; a click opens the pool panel.
 *
 * It is the way in where there is no status bar (Notebook 7). It follows its own
 * notebook's kernel, and carries the same `data-*` numbers as the status bar item.
 */
export class PoolToolbarItem extends Widget {
  constructor(connection: PoolConnection, onClick: () => void) {
    super();
    this._connection = connection;
    this.addClass('dspool-toolbar-item');
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this._dot = document.createElement('span');
    this._dot.className = 'dspool-status-dot';
    this._text = document.createElement('span');
    this._text.className = 'dspool-toolbar-text';
    this.node.append(this._dot, this._text);
    this.node.addEventListener('click', onClick);
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        onClick();
      }
    });
    connection.changed.connect(this._render, this);
    this._render();
  }

  private _render(): void {
    const status = this._connection.status;
    const node = this.node;
    for (const state of ['starting', 'healthy', 'degraded', 'closed']) {
      node.classList.toggle(`dspool-state-${state}`, status?.state === state);
    }
    if (!status) {
      node.dataset.state = 'none';
      this._text.textContent = 'dspool: no pool';
      node.title =
        'This kernel has no dspool pool (%load_ext dspool_jupyter, then ' +
        '%dspool start). Click to open the pool panel.';
      return;
    }
    const died = deaths(this._connection.departed).length;
    node.dataset.state = status.state;
    node.dataset.ready = String(status.ready_count);
    node.dataset.target = String(status.target);
    node.dataset.queued = String(status.queued);
    node.dataset.failed = String(status.failed);
    node.dataset.died = String(died);
    this._text.textContent =
      `dspool ${status.ready_count}/${status.target} · ${status.queued} queued` +
      (status.failed ? ` · ${status.failed} failed` : '') +
      (died ? ` · ${died} died` : '');
    node.title =
      `dspool pool: ${status.state}; ${status.ready_count} of ${status.target} ` +
      `workers ready, ${status.running} of ${slotCount(status)} slots in flight, ` +
      `${status.queued} queued, ${status.failed} failed. Click to open the pool panel.`;
  }

  private _connection: PoolConnection;
  private _dot: HTMLElement;
  private _text: HTMLElement;
}
