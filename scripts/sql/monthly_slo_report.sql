-- The requirements' "Monthly SLO Report" (requirements-observability.md), against the daily SLO aggregates
-- (aggregates.slo_daily, written by scripts/aggregate_metrics.py; components in infra/aggregates.py):
--   availability_pct     api-availability: 1 - Σbad / Σtotal of http_requests_total (5xx are the bad ones)
--   query1_p95_ms        query1-latency: Prometheus' histogram_quantile over the month's summed buckets
--   downtime_minutes     the unavailable share of the month's minutes (the requirements' 43200 is a 30-day month)
--   error_budget_pct     the share of the 0.1 % budget consumed
-- The same figures as `scripts/slo_report.py --from-postgres DSN --month YYYY-MM` (tests/monitoring/test_aggregates_live.py).
--
--   psql "host=pg-primary... dbname=metrics sslmode=verify-full" -v month=2026-10 -f scripts/sql/monthly_slo_report.sql
-- Without -v month: the previous calendar month, as in the requirements.
\if :{?month}
\else
\set month ''
\endif

WITH report AS (
    SELECT coalesce(to_date(nullif(:'month', ''), 'YYYY-MM'),
                    date_trunc('month', current_date - interval '1 month')::date) AS month
),
span AS (
    SELECT month, (month + interval '1 month')::date AS next,
           extract(epoch FROM (month + interval '1 month') - month) / 60 AS minutes
      FROM report
),
availability AS (
    SELECT sum(value) FILTER (WHERE component = 'bad') / nullif(sum(value) FILTER (WHERE component = 'total'), 0) AS bad
      FROM aggregates.slo_daily, span
     WHERE slo = 'api-availability' AND day >= span.month AND day < span.next
),
-- histogram_quantile(0.95, ...) as Prometheus computes it (promql/quantile.go): equal bounds merged, counts made
-- monotonic, the first bucket holding the rank, linear interpolation inside it.
buckets AS (
    SELECT le::float8 AS upper, sum(value) AS count
      FROM aggregates.slo_daily, span
     WHERE slo = 'query1-latency' AND component = 'bucket' AND day >= span.month AND day < span.next
     GROUP BY le::float8
),
monotonic AS (
    SELECT upper, max(count) OVER (ORDER BY upper) AS count FROM buckets
),
ordered AS (
    SELECT upper, count,
           lag(upper) OVER w AS lower, lag(count) OVER w AS below,
           row_number() OVER w AS i, count(*) OVER () AS n,
           max(count) OVER () AS observations,
           max(upper) OVER () AS highest
      FROM monotonic WINDOW w AS (ORDER BY upper)
),
holding AS (
    SELECT * FROM ordered WHERE i < n AND count >= 0.95 * observations ORDER BY upper LIMIT 1
),
query1 AS (
    SELECT CASE
             WHEN (SELECT max(n) FROM ordered) < 2 OR (SELECT max(highest) FROM ordered) <> 'Infinity'
                  OR (SELECT max(observations) FROM ordered) = 0 THEN NULL
             WHEN NOT EXISTS (SELECT FROM holding) THEN (SELECT upper FROM ordered WHERE i = n - 1)
             WHEN (SELECT i FROM holding) = 1 AND (SELECT upper FROM holding) <= 0 THEN (SELECT upper FROM holding)
             ELSE (SELECT coalesce(lower, 0) + (upper - coalesce(lower, 0))
                          * ((0.95 * observations - coalesce(below, 0)) / (count - coalesce(below, 0))) FROM holding)
           END AS p95
)
SELECT to_char(span.month, 'YYYY-MM') AS month,
       round((100 * (1 - availability.bad))::numeric, 3) AS availability_pct,
       CASE WHEN availability.bad IS NULL THEN 'NO DATA'
            WHEN round((100 * (1 - availability.bad))::numeric, 3) >= 99.9 THEN 'PASS' ELSE 'FAIL' END AS availability_slo,
       round((query1.p95 * 1000)::numeric, 3) AS query1_p95_ms,
       CASE WHEN query1.p95 IS NULL THEN 'NO DATA' WHEN query1.p95 * 1000 < 5 THEN 'PASS' ELSE 'FAIL' END AS query1_slo,
       round((availability.bad * span.minutes)::numeric, 2) AS downtime_minutes,
       round((100 * availability.bad / 0.001)::numeric, 2) AS error_budget_pct
  FROM span, availability, query1;
