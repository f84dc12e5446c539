-- The W3C trace context (`traceparent`) of the call that submitted a job:
-- the worker's `job` span continues that trace. Not part of the job's spec,
-- so an idempotent resubmission from another trace still finds the job.
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
