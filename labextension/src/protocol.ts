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
  /** 'starting', 'idle' or 'busy'. */
  state: string;
  calls: number;
  errors: number;
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
}

/** The pool at one moment (dspool_jupyter.status.PoolStatus.to_dict()). */
export interface IPoolStatus {
  /** 'starting', 'healthy', 'degraded' or 'closed'. */
  state: string;
  target: number;
  ready_count: number;
  ready: boolean;
  workers: IWorkerStatus[];
  queued: number;
  running: number;
  calls: number;
  failed: number;
  replaced: number;
  started_at: number;
  startup_seconds: number | null;
  last_error: string | null;
  recent_failures: IFailedCall[];
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
