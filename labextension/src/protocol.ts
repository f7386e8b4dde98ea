/**
 * The comm protocol with the kernel (see dspool_jupyter/comm.py, version 1).
 */

/** The comm target the Python package registers in the kernel. */
export const TARGET_NAME = 'dspool';

/** The protocol version this frontend speaks. */
export const PROTOCOL_VERSION = 1;

/** One worker of the pool (dspool_jupyter.status.WorkerStatus). */
export interface IWorkerStatus {
  id: string;
  pid: number | null;
  /** 'starting', 'idle', 'busy' or 'stopping'. */
  state: string;
  /** Every call that ended on this worker; `errors` of them in an error. */
  calls: number;
  errors: number;
  done?: number;
  cancelled?: number;
  /** Calls running on it now, out of `slots`. */
  active?: number;
  slots?: number;
  rss_bytes: number | null;
  /** Kernel wall clock, seconds since the epoch. */
  last_heartbeat: number | null;
  started_at: number;
  program: string | null;
}

/** A recent failed call (dspool_jupyter.status.FailedCall). */
export interface IFailedCall {
  call_id: number;
  program: string;
  worker_id: string | null;
  error: string;
  message: string;
  traceback: string;
  time: number;
  /** What went wrong, without the program and worker (e.g. `ValueError: x`). */
  detail?: string;
  exit_code?: number | null;
  /** Signal name, e.g. `SIGKILL`. */
  signal?: string | null;
  /** Seconds. */
  timeout?: number | null;
}

/** The pool at one moment (dspool_jupyter.status.PoolStatus.to_dict()). */
export interface IPoolStatus {
  /** 'starting', 'healthy', 'degraded' or 'closed'. */
  state: string;
  target: number;
  ready_count: number;
  ready: boolean;
  workers: IWorkerStatus[];
  /** Calls waiting for a slot. */
  queued: number;
  /** Calls in flight (running on a worker now), out of `slots`. */
  running: number;
  /** Every call that ended = done + failed + cancelled. */
  calls: number;
  failed: number;
  done?: number;
  cancelled?: number;
  slots?: number;
  replaced: number;
  started_at: number;
  startup_seconds: number | null;
  last_error: string | null;
  recent_failures: IFailedCall[];
  /** Modules the template imports before any worker forks. */
  preload?: string[];
  preload_started_at?: number | null;
  /** Null while the import runs. */
  preload_seconds?: number | null;
  /** The provider limits, usage and budget; null for a pool without limits. */
  limits?: ILimits | null;
  /** The status widget's line of byte counters; '' while nothing travelled. */
  transfer?: string;
}

/** One model as the permit broker sees it (dspool_jupyter.usage.ModelSnapshot). */
export interface IModelLimit {
  model: string;
  /** The limits set (per minute), or null. */
  rpm: number | null;
  tpm: number | null;
  /** The pace permits are handed out at now, null = unpaced. */
  pace_rpm: number | null;
  /** Answered requests and their tokens over the last minute. */
  achieved_rpm: number;
  achieved_tpm: number;
  in_flight: number;
  /** 429s seen. */
  rate_limited: number;
  /** Seconds left in a pause after a 429. */
  paused_for: number;
}

/** LM requests and their tokens and cost (dspool_jupyter.usage.Usage.as_dict()). */
export interface IUsage {
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** Dollars; null while no answered request had a known price. */
  cost: number | null;
  rate_limited: number;
}

/** The provider limits' snapshot (dspool_jupyter.usage.LimitsSnapshot.as_dict()). */
export interface ILimits {
  models: IModelLimit[];
  budget: {
    max_cost: number | null;
    max_tokens: number | null;
    spent_cost: number;
    spent_tokens: number;
    exhausted: boolean;
  };
  usage: {
    total: IUsage;
    by_program: Record<string, IUsage>;
    by_session: Record<string, IUsage>;
    by_model: Record<string, IUsage>;
  };
}

/** A worker that left the pool recently (kept as long as the status widget keeps it). */
export interface IDepartedWorker {
  id: string;
  pid: number | null;
  /** 'dead' (crashed or killed) or 'stopped' (restarted, pool closed). */
  state: string;
  /** How it left, e.g. 'killed by SIGKILL'. */
  note: string;
  calls: number;
  errors: number;
  /** Seconds since it left. */
  age: number;
}

/** An urgent event folded into a snapshot. */
export interface IEventBrief {
  kind: string;
  time: number;
  worker_id?: string;
}

/** Kernel to frontend: a snapshot. */
export interface IStatusMessage {
  type: 'status';
  protocol: number;
  seq: number;
  /** Kernel wall clock when the snapshot was taken, seconds since the epoch. */
  time: number;
  status: IPoolStatus | null;
  events: IEventBrief[];
  departed?: IDepartedWorker[];
}

/** Kernel to frontend: the outcome of a command. */
export interface IResultMessage {
  type: 'result';
  request_id: string | null;
  ok: boolean;
  error: string | null;
}

/** Kernel to frontend: the announcement sent when the package is loaded. */
export interface IHelloMessage {
  type: 'hello';
  protocol: number;
  version: string;
}

export type KernelMessage = IStatusMessage | IResultMessage | IHelloMessage;

/** Frontend to kernel. */
export type FrontendMessage =
  | { type: 'hello' }
  | { type: 'refresh' }
  | { type: 'restart_worker'; worker_id: string; request_id: string }
  | { type: 'restart_pool'; request_id: string };
