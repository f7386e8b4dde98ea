import { Dialog, showDialog } from '@jupyterlab/apputils';
import { refreshIcon } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  activeCount,
  ago,
  failureText,
  formatBytes,
  formatSeconds,
  limitLines,
  slotCount,
  startingText
} from './format';
import { ActivePoolModel } from './model';
import {
  IDepartedWorker,
  IFailedCall,
  IPoolStatus,
  IWorkerStatus
} from './protocol';

/** While the panel is shown, ask for a fresh snapshot this often (ms). */
const REFRESH_INTERVAL_MS = 2000;

/** Sort key of a worker id: `w12` → 12. */
function workerOrder(id: string): number {
  const n = Number(id.replace(/^w/, ''));
  return Number.isFinite(n) ? n : Number.MAX_SAFE_INTEGER;
}

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
 * The side panel: start-up progress, the provider limits and LM usage (when any), the
 * worker table, recent failed calls with their tracebacks, and buttons to restart a
 * worker or the whole pool.
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
    const sections = [
      this._renderSummary(status),
      this._renderProgress(status, connection.clockOffset)
    ];
    if (status.transfer) {
      // the widget's words: bytes sent, received, shared instead of sent, placed
      sections.push(el('section', 'dspool-transfer', status.transfer));
    }
    const limits = limitLines(status.limits);
    if (limits.length) {
      sections.push(this._renderLimits(limits));
    }
    sections.push(
      this._renderWorkers(status, connection.departed, connection.clockOffset),
      this._renderFailures(status)
    );
    this._body.replaceChildren(...sections);
  }

  /** Per model the achieved rates against its limit, the LM usage, the budget. */
  private _renderLimits(lines: string[]): HTMLElement {
    const section = el('section', 'dspool-limits');
    const title = el('h3', '', 'LM limits and usage');
    title.title =
      'requests and tokens per minute over the last minute, against the pool-wide limit';
    section.append(title);
    for (const line of lines) {
      section.append(el('div', 'dspool-limit-line', line));
    }
    return section;
  }

  private _renderSummary(status: IPoolStatus): HTMLElement {
    const section = el('section', 'dspool-summary');
    const badge = el(
      'span',
      `dspool-badge dspool-state-${status.state}`,
      status.state
    );
    // the status widget's words: calls = done + failed + cancelled
    const facts: [string, string, string][] = [
      ['ready', `${status.ready_count}/${status.target}`, 'workers ready'],
      [
        'in flight',
        `${status.running}/${slotCount(status)}`,
        'calls running now, out of the slots of the ready workers'
      ],
      ['queued', String(status.queued), 'calls waiting for a slot'],
      ['calls', String(status.calls), 'calls that ended'],
      ['done', String(status.done ?? 0), 'calls that returned a value'],
      ['failed', String(status.failed), 'calls that ended in an error'],
      ['cancelled', String(status.cancelled ?? 0), 'calls cancelled'],
      ['replaced', String(status.replaced), 'workers replaced']
    ];
    if (status.startup_seconds !== null) {
      facts.push([
        'start-up',
        formatSeconds(status.startup_seconds),
        'time until every worker was ready'
      ]);
    }
    const list = el('dl', 'dspool-facts');
    for (const [name, value, title] of facts) {
      const item = el(
        'div',
        `dspool-fact dspool-fact-${name.replace(/\W+/g, '-')}`
      );
      item.title = title;
      item.append(el('dt', '', name), el('dd', '', value));
      list.append(item);
    }
    section.append(badge, list);
    if (status.last_error) {
      section.append(el('div', 'dspool-last-error', status.last_error));
    }
    return section;
  }

  private _renderProgress(
    status: IPoolStatus,
    clockOffset: number
  ): HTMLElement {
    const section = el('section', 'dspool-progress');
    const doing = startingText(status, Date.now() / 1000 + clockOffset);
    const label = el(
      'div',
      'dspool-progress-label',
      status.ready
        ? `All ${status.target} workers ready`
        : `Starting: ${status.ready_count} of ${status.target} workers ready`
    );
    if (doing) {
      label.append(el('div', 'dspool-progress-doing', doing));
    }
    const bar = el('progress', 'dspool-progress-bar');
    bar.max = Math.max(1, status.target);
    bar.value = status.ready_count;
    section.append(label, bar);
    return section;
  }

  private _renderWorkers(
    status: IPoolStatus,
    departed: IDepartedWorker[],
    clockOffset: number
  ): HTMLElement {
    const section = el('section', 'dspool-workers');
    const left = departed.filter(
      d => !status.workers.some(w => w.id === d.id)
    ).length;
    section.append(
      el(
        'h3',
        '',
        `Workers (${status.workers.length}` +
          (left ? `; ${left} left in the last 15 s)` : ')')
      )
    );
    const scroller = el('div', 'dspool-table-scroller');
    const table = el('table', 'dspool-worker-table');
    const head = el('tr');
    const columns: [string, string][] = [
      ['worker', 'worker id and process id'],
      [
        'state',
        'starting, idle or busy (with its program and slots in use); ' +
          'calls that ended on it and errors'
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
    const rows: [string, HTMLElement][] = status.workers.map(w => [
      w.id,
      this._renderWorker(w, clockOffset)
    ]);
    for (const gone of departed) {
      if (!status.workers.some(w => w.id === gone.id)) {
        rows.push([gone.id, this._renderDeparted(gone)]);
      }
    }
    rows.sort((a, b) => workerOrder(a[0]) - workerOrder(b[0]));
    for (const [, row] of rows) {
      body.append(row);
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
    const slots = el(
      'span',
      'dspool-worker-slots',
      ` · ${activeCount(worker)}/${worker.slots ?? 1} slots`
    );
    slots.title = 'calls running on it now, out of its slots';
    const name = el(
      'div',
      'dspool-worker-state-name',
      worker.program && worker.state === 'busy'
        ? `busy: ${worker.program}`
        : worker.state
    );
    name.append(slots);
    state.append(name);
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
    button.disabled =
      this._restarting.has(worker.id) ||
      (worker.state !== 'idle' && worker.state !== 'busy');
    button.addEventListener('click', () => void this._restartWorker(worker.id));
    cell.append(button);
    row.append(cell);
    return row;
  }

  /** A worker that left: kept (in red when it died) as long as the widget keeps it. */
  private _renderDeparted(gone: IDepartedWorker): HTMLElement {
    const row = el(
      'tr',
      `dspool-worker dspool-worker-departed dspool-worker-${gone.state}`
    );
    row.dataset.workerId = gone.id;
    row.dataset.pid = String(gone.pid ?? '');
    const id = el('td', 'dspool-worker-id');
    id.append(
      el('div', '', gone.id),
      el('div', 'dspool-worker-pid', gone.pid === null ? '' : `pid ${gone.pid}`)
    );
    const state = el('td', 'dspool-worker-state');
    state.append(
      el('div', 'dspool-worker-state-name', gone.state),
      el('div', 'dspool-worker-note', gone.note),
      el(
        'div',
        'dspool-worker-calls',
        `${gone.calls} call${gone.calls === 1 ? '' : 's'}` +
          (gone.errors
            ? `, ${gone.errors} error${gone.errors === 1 ? '' : 's'}`
            : '')
      )
    );
    const memory = el('td', 'dspool-worker-memory', '—');
    // an empty actions cell keeps every row's columns (and buttons) aligned
    row.append(id, state, memory, el('td', 'dspool-worker-actions'));
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
    const line = [
      el('span', 'dspool-failure-time', when),
      el('span', 'dspool-failure-program', failure.program),
      el('span', 'dspool-failure-worker', failure.worker_id ?? ''),
      el('span', 'dspool-failure-error', failureText(failure))
    ];
    if (!failure.traceback) {
      // a crash or a timeout: the line says the exit code, signal or timeout
      const plain = el('div', 'dspool-failure dspool-failure-plain');
      plain.dataset.callId = key;
      const inner = el('div', 'dspool-failure-line');
      inner.append(...line);
      plain.append(inner);
      return plain;
    }
    const summary = el('summary');
    summary.append(...line);
    details.append(summary, el('pre', 'dspool-traceback', failure.traceback));
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
