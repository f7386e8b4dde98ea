import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISignal, Signal } from '@lumino/signaling';

import { PoolConnection } from './connection';
import { IDepartedWorker, IPoolStatus } from './protocol';

/**
 * The pool of the active notebook's kernel.
 *
 * Every open notebook gets a {@link PoolConnection} (so a kernel's announcement is
 * caught even while its notebook is in the background); the model shows the one of
 * the notebook the tracker calls current, and switches with it.
 */
export class ActivePoolModel {
  constructor(tracker: INotebookTracker) {
    this._tracker = tracker;
    tracker.forEach(panel => this._track(panel));
    tracker.widgetAdded.connect((_s, panel) => this._track(panel), this);
    tracker.currentChanged.connect(this._onCurrentChanged, this);
    this._onCurrentChanged();
  }

  /** Emitted when the current connection or its status changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The connection of the current notebook, if any. */
  get current(): PoolConnection | null {
    return this._current;
  }

  /** The current notebook's pool, or `null`. */
  get status(): IPoolStatus | null {
    return this._current?.status ?? null;
  }

  /** Workers of the current notebook's pool that left it recently. */
  get departed(): IDepartedWorker[] {
    return this._current?.departed ?? [];
  }

  /** The connection of ``panel``'s kernel (tracked from now on). */
  connectionFor(panel: NotebookPanel): PoolConnection {
    this._track(panel);
    return this._connections.get(panel)!;
  }

  /** The current notebook's title, for the panel's header. */
  get notebookName(): string {
    return this._tracker.currentWidget?.title.label ?? '';
  }

  private _track(panel: NotebookPanel): void {
    if (this._connections.has(panel)) {
      return;
    }
    const connection = new PoolConnection(panel.sessionContext);
    this._connections.set(panel, connection);
    connection.changed.connect(() => {
      if (connection === this._current) {
        this._changed.emit();
      }
    }, this);
    panel.disposed.connect(() => {
      this._connections.delete(panel);
      connection.dispose();
      if (connection === this._current) {
        this._current = null;
        this._changed.emit();
      }
    }, this);
  }

  private _onCurrentChanged(): void {
    const panel = this._tracker.currentWidget;
    if (panel) {
      this._track(panel);
    }
    const next = panel ? (this._connections.get(panel) ?? null) : null;
    if (next !== this._current) {
      this._current = next;
      this._changed.emit();
    }
  }

  private _tracker: INotebookTracker;
  private _connections = new Map<NotebookPanel, PoolConnection>();
  private _current: PoolConnection | null = null;
  private _changed = new Signal<this, void>(this);
}
