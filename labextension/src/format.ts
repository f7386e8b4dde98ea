import {
  IDepartedWorker,
  IFailedCall,
  ILimits,
  IModelLimit,
  IPoolStatus
} from './protocol';

/*
 * The words are the status widget's (dspool_jupyter/widget.py): `calls` every call that
 * ended = done + failed + cancelled; `in flight` calls running now out of the ready
 * workers' `slots`; `queued` calls waiting for a slot.
 */

/** Slots of the ready workers (today's pool leaves `slots` at 0: count them). */
export function slotCount(status: IPoolStatus): number {
  if (status.slots) {
    return status.slots;
  }
  return status.workers
    .filter(w => w.state === 'idle' || w.state === 'busy')
    .reduce((sum, w) => sum + (w.slots ?? 1), 0);
}

/** Calls running on a worker now (a busy worker of one slot runs one). */
export function activeCount(worker: {
  state: string;
  active?: number;
}): number {
  return worker.active || (worker.state === 'busy' ? 1 : 0);
}

/** Departed workers that died (not stopped on purpose). */
export function deaths(departed: IDepartedWorker[]): IDepartedWorker[] {
  return departed.filter(d => d.state === 'dead');
}

/** What a start is doing beyond the ready count (the preload import), or ''. */
export function startingText(status: IPoolStatus, kernelNow: number): string {
  const preload = status.preload ?? [];
  if (
    status.state === 'closed' ||
    preload.length === 0 ||
    status.preload_started_at === null ||
    status.preload_started_at === undefined ||
    (status.preload_seconds !== null && status.preload_seconds !== undefined)
  ) {
    return '';
  }
  const soFar = Math.max(0, kernelNow - status.preload_started_at);
  return `importing ${preload.join(', ')} in the template (${Math.round(soFar)} s so far)`;
}

/** The status item's text before the failures, e.g. `dspool 2/2 · 1/2 in flight · 0 queued · `. */
export function summaryHead(status: IPoolStatus): string {
  return (
    `dspool ${status.ready_count}/${status.target} · ` +
    `${status.running}/${slotCount(status)} in flight · ${status.queued} queued · `
  );
}

/** What went wrong, without the program and worker the line already names. */
export function failureDetail(failure: IFailedCall): string {
  if (failure.detail) {
    return failure.detail;
  }
  const message = (failure.message ?? '').split('\n')[0];
  return message ? `${failure.error}: ${message}` : failure.error;
}

/** One failed call's error, said once: `ValueError: x` or `WorkerCrashed: killed by SIGKILL`. */
export function failureText(failure: IFailedCall): string {
  const detail = failureDetail(failure).split('\n')[0];
  if (failure.traceback || failure.error === 'ProgramError') {
    return detail;
  }
  return `${failure.error}: ${detail}`;
}

/** A byte count as `12.3 MB`, or an em dash. */
export function formatBytes(bytes: number | null): string {
  if (bytes === null || bytes === undefined) {
    return '—';
  }
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** Seconds as `0.4 s`, `12 s`, `3 min`, `2 h`. */
export function formatSeconds(seconds: number): string {
  const s = Math.max(0, seconds);
  if (s < 10) {
    return `${s.toFixed(1)} s`;
  }
  if (s < 120) {
    return `${Math.round(s)} s`;
  }
  if (s < 7200) {
    return `${Math.round(s / 60)} min`;
  }
  return `${Math.round(s / 3600)} h`;
}

/** How long ago a kernel timestamp was, given the kernel-minus-page clock offset. */
export function ago(kernelTime: number | null, clockOffset: number): string {
  if (kernelTime === null || kernelTime === undefined) {
    return '—';
  }
  const now = Date.now() / 1000 + clockOffset;
  return `${formatSeconds(now - kernelTime)} ago`;
}

/** A number as the status widget writes it: `10,000`, `0.5`. */
function count(value: number, digits = 6): string {
  return value.toLocaleString('en-US', { maximumFractionDigits: digits });
}

/** Dollars: cents above a dollar, six decimals below (usage.cost_text). */
export function costText(cost: number | null): string {
  if (cost === null) {
    return 'n/a';
  }
  return cost >= 1
    ? `$${cost.toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`
    : `$${cost.toFixed(6)}`;
}

/** One model's line, the status widget's (usage.model_line). */
export function modelLine(model: IModelLimit): string {
  const parts = [
    model.rpm
      ? `${Math.round(model.achieved_rpm)}/${count(model.rpm)} rpm`
      : `${Math.round(model.achieved_rpm)} rpm (no limit)`
  ];
  if (model.tpm) {
    parts.push(
      `${count(Math.round(model.achieved_tpm))}/${count(model.tpm)} tpm`
    );
  }
  parts.push(`${model.in_flight} in flight`, `${model.rate_limited} 429s`);
  if (model.paused_for > 0) {
    parts.push(`paused ${model.paused_for.toFixed(1)} s`);
  }
  return `${model.model}: ${parts.join(', ')}`;
}

/**
 * The provider limits as the status widget shows them (LimitsSnapshot.lines): one line
 * per model, the LM usage, the budget; none when nothing is limited, budgeted or spent.
 */
export function limitLines(limits: ILimits | null | undefined): string[] {
  if (!limits) {
    return [];
  }
  const lines = limits.models.map(modelLine);
  const total = limits.usage.total;
  if (total.requests || total.rate_limited) {
    lines.push(
      `LM usage: ${count(total.requests)} requests, ${count(total.total_tokens)} tokens ` +
        `(${count(total.prompt_tokens)} prompt), ${costText(total.cost)}, ` +
        `${total.rate_limited} 429s`
    );
  }
  const budget = limits.budget;
  const parts: string[] = [];
  if (budget.max_cost !== null) {
    parts.push(
      `${costText(budget.spent_cost)} of ${costText(budget.max_cost)}`
    );
  }
  if (budget.max_tokens !== null) {
    parts.push(
      `${count(budget.spent_tokens)} of ${count(budget.max_tokens)} tokens`
    );
  }
  if (parts.length) {
    lines.push(
      `budget: ${parts.join(' and ')} spent` +
        (budget.exhausted ? ' (exhausted: LM requests fail at once)' : '')
    );
  }
  return lines;
}
