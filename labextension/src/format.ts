import { IPoolStatus } from './protocol';

/** Number of workers whose state is 'busy'. */
export function busyCount(status: IPoolStatus): number {
  return status.workers.filter(w => w.state === 'busy').length;
}

/** The status item's text before the failures, e.g. `dspool 2/2 · 1 busy · `. */
export function summaryHead(status: IPoolStatus): string {
  return `dspool ${status.ready_count}/${status.target} · ${busyCount(status)} busy · `;
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
