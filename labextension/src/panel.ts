import { Dialog, showDialog } from '@jupyterlab/apputils';
import { refreshIcon } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { ago, busyCount, formatBytes, formatSeconds } from './format';
import { ActivePoolModel } from './model';
import { IFailedCall, IPoolStatus, IWorkerStatus } from './protocol';

/** While the panel is shown, ask for a fresh snapshot this often (ms). */
const REFRESH_INTERVAL_MS = 2000;

/** Build an element with a class and optional text. */
function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className?: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/**
 * The side panel: start-up progress, the worker table, recent failed calls with their
 * tracebacks, and buttons to restart a worker or the whole pool.
 */
export class PoolPanel extends Widget {
  constructor(model: ActivePoolModel) {
    super();
    this._model = model;
    this.id = 'dspool-panel';
    this.addClass('dspool-panel');
    this.title.caption = 'dspool worker pool';
    this._header = el('div', 'dspool-panel-header');
    this._body = el('div', 'dspool-panel-body');
    this._footer = el('div', 'dspool-panel-footer');
    this._message = el('div', 'dspool-message');
    this.node.append(this._header, this._body, this._footer, this._message);
    this._buildFooter();
    model.changed.connect(this._onChanged, this);
    this._render();
  }

  dispose(): void {
    this._stopPolling();
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._render();
    this._model.current?.refresh();
    this._stopPolling();
    this._timer = window.setInterval(() => {
      this._model.current?.refresh();
    }, REFRESH_INTERVAL_MS);
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._stopPolling();
  }

  private _stopPolling(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  private _onChanged(): void {
    if (this.isVisible) {
      this._render();
    }
  }

  private _buildFooter(): void {
    const restart = el('button', 'jp-Button jp-mod-styled jp-mod-warn');
    restart.classList.add('dspool-restart-pool');
    restart.textContent = 'Restart pool';
    restart.title =
      'Replace every worker (running calls fail with WorkerCrashed)';
    restart.addEventListener('click', () => void this._restartPool());
    const refresh = el('button', 'jp-Button jp-mod-styled jp-mod-reject');
    refresh.classList.add('dspool-refresh');
    refresh.textContent = 'Refresh';
    refresh.addEventListener('click', () => this._model.current?.refresh());
    this._footer.append(restart, refresh);
    this._restartPoolButton = restart;
  }

  private _render(): void {
    const status = this._model.status;
    const connection = this._model.current;
    this._header.replaceChildren(
      el('h2', 'dspool-panel-title', 'dspool pool'),
      el(
        'div',
        'dspool-panel-notebook',
        this._model.notebookName || 'no notebook'
      )
    );
    this._restartPoolButton.disabled = !status;
    if (!status || !connection) {
      this.node.dataset.state = 'none';
      this._say('');
      const empty = el('div', 'dspool-empty');
      empty.append(
        el('p', '', 'The active notebook’s kernel has no dspool pool.'),
        el(
          'p',
          'dspool-hint',
          'Start one in a cell: %load_ext dspool_jupyter, then %dspool start ' +
            '(or from dspool_jupyter import Pool; pool = Pool()).'
        )
      );
      this._body.replaceChildren(empty);
      return;
    }
    this.node.dataset.state = status.state;
    this._body.replaceChildren(
      this._renderSummary(status),
      this._renderProgress(status),
      this._renderWorkers(status, connection.clockOffset),
      this._renderFailures(status)
    );
  }

  private _renderSummary(status: IPoolStatus): HTMLElement {
    const section = el('section', 'dspool-summary');
    const badge = el(
      'span',
      `dspool-badge dspool-state-${status.state}`,
      status.state
    );
    const facts: [string, string][] = [
      ['ready', `${status.ready_count}/${status.target}`],
      ['busy', String(busyCount(status))],
      ['queued', String(status.queued)],
      ['calls', String(status.calls)],
      ['failed', String(status.failed)],
      ['replaced', String(status.replaced)]
    ];
    if (status.startup_seconds !== null) {
      facts.push(['start-up', formatSeconds(status.startup_seconds)]);
    }
    const list = el('dl', 'dspool-facts');
    for (const [name, value] of facts) {
      const item = el('div', `dspool-fact dspool-fact-${name}`);
      item.append(el('dt', '', name), el('dd', '', value));
      list.append(item);
    }
    section.append(badge, list);
    if (status.last_error) {
      section.append(el('div', 'dspool-last-error', status.last_error));
    }
    return section;
  }

  private _renderProgress(status: IPoolStatus): HTMLElement {
    const section = el('section', 'dspool-progress');
    const label = el(
      'div',
      'dspool-progress-label',
      status.ready
        ? `All ${status.target} workers ready`
        : `Starting: ${status.ready_count} of ${status.target} workers ready`
    );
    const bar = el('progress', 'dspool-progress-bar');
    bar.max = Math.max(1, status.target);
    bar.value = status.ready_count;
    section.append(label, bar);
    return section;
  }

  private _renderWorkers(
    status: IPoolStatus,
    clockOffset: number
  ): HTMLElement {
    const section = el('section', 'dspool-workers');
    section.append(el('h3', '', `Workers (${status.workers.length})`));
    const scroller = el('div', 'dspool-table-scroller');
    const table = el('table', 'dspool-worker-table');
    const head = el('tr');
    const columns: [string, string][] = [
      ['worker', 'worker id and process id'],
      [
        'state',
        'starting, idle or busy (with its program); calls run and errors'
      ],
      ['memory', 'resident memory; time since the last heartbeat'],
      ['', '']
    ];
    for (const [name, title] of columns) {
      const th = el('th', '', name);
      th.title = title;
      head.append(th);
    }
    table.append(el('thead'));
    table.tHead!.append(head);
    const body = el('tbody');
    for (const worker of status.workers) {
      body.append(this._renderWorker(worker, clockOffset));
    }
    table.append(body);
    scroller.append(table);
    section.append(scroller);
    return section;
  }

  private _renderWorker(
    worker: IWorkerStatus,
    clockOffset: number
  ): HTMLElement {
    const row = el('tr', `dspool-worker dspool-worker-${worker.state}`);
    row.dataset.workerId = worker.id;
    row.dataset.pid = String(worker.pid ?? '');
    const id = el('td', 'dspool-worker-id');
    id.append(
      el('div', '', worker.id),
      el(
        'div',
        'dspool-worker-pid',
        worker.pid === null ? '' : `pid ${worker.pid}`
      )
    );
    const state = el('td', 'dspool-worker-state');
    state.append(
      el(
        'div',
        'dspool-worker-state-name',
        worker.program && worker.state === 'busy'
          ? `busy: ${worker.program}`
          : worker.state
      )
    );
    const calls = el(
      'div',
      'dspool-worker-calls',
      `${worker.calls} call${worker.calls === 1 ? '' : 's'}`
    );
    if (worker.errors > 0) {
      calls.append(
        el(
          'span',
          'dspool-worker-errors',
          `, ${worker.errors} error${worker.errors === 1 ? '' : 's'}`
        )
      );
    }
    state.append(calls);
    const memory = el('td', 'dspool-worker-memory');
    memory.append(
      el('div', '', formatBytes(worker.rss_bytes)),
      el(
        'div',
        'dspool-worker-heartbeat',
        `beat ${ago(worker.last_heartbeat, clockOffset)}`
      )
    );
    row.append(id, state, memory);
    const cell = el('td', 'dspool-worker-actions');
    const button = el(
      'button',
      'jp-Button jp-mod-minimal dspool-restart-worker'
    );
    button.title = `Restart worker ${worker.id} (kill it and start a replacement)`;
    button.setAttribute('aria-label', button.title);
    refreshIcon.element({ container: button, tag: null });
    button.disabled = this._restarting.has(worker.id);
    button.addEventListener('click', () => void this._restartWorker(worker.id));
    cell.append(button);
    row.append(cell);
    return row;
  }

  private _renderFailures(status: IPoolStatus): HTMLElement {
    const section = el('section', 'dspool-failures');
    const failures = [...status.recent_failures].reverse();
    section.append(el('h3', '', `Recent failed calls (${failures.length})`));
    if (failures.length === 0) {
      section.append(el('div', 'dspool-none', 'None.'));
      return section;
    }
    for (const failure of failures) {
      section.append(this._renderFailure(failure));
    }
    return section;
  }

  private _renderFailure(failure: IFailedCall): HTMLElement {
    const details = el('details', 'dspool-failure');
    const key = String(failure.call_id);
    details.dataset.callId = key;
    details.open = this._expanded.has(key);
    details.addEventListener('toggle', () => {
      if (details.open) {
        this._expanded.add(key);
      } else {
        this._expanded.delete(key);
      }
    });
    const when = new Date(failure.time * 1000).toLocaleTimeString([], {
      hour12: false
    });
    const summary = el('summary');
    summary.append(
      el('span', 'dspool-failure-time', when),
      el('span', 'dspool-failure-program', failure.program),
      el('span', 'dspool-failure-worker', failure.worker_id ?? ''),
      el(
        'span',
        'dspool-failure-error',
        failure.message ? `${failure.error}: ${failure.message}` : failure.error
      )
    );
    details.append(
      summary,
      el('pre', 'dspool-traceback', failure.traceback || '(no traceback)')
    );
    return details;
  }

  private async _restartWorker(workerId: string): Promise<void> {
    const connection = this._model.current;
    if (!connection) {
      return;
    }
    this._restarting.add(workerId);
    this._render();
    try {
      await connection.restartWorker(workerId);
      this._say(`Worker ${workerId} restarted.`);
    } catch (reason) {
      this._say(
        `Restarting worker ${workerId} failed: ${String(reason)}`,
        true
      );
    } finally {
      this._restarting.delete(workerId);
      this._render();
    }
  }

  private async _restartPool(): Promise<void> {
    const connection = this._model.current;
    if (!connection) {
      return;
    }
    const answer = await showDialog({
      title: 'Restart the pool?',
      body: 'Every worker is replaced; calls running now fail with WorkerCrashed.',
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Restart' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await connection.restartPool();
      this._say('Pool restarted.');
    } catch (reason) {
      this._say(`Restarting the pool failed: ${String(reason)}`, true);
    }
  }

  private _say(text: string, error = false): void {
    this._message.textContent = text;
    this._message.classList.toggle('dspool-message-error', error);
  }

  private _model: ActivePoolModel;
  private _header: HTMLElement;
  private _body: HTMLElement;
  private _footer: HTMLElement;
  private _message: HTMLElement;
  private _restartPoolButton!: HTMLButtonElement;
  private _timer: number | null = null;
  private _expanded = new Set<string>();
  private _restarting = new Set<string>();
}
