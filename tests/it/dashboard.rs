//! The Grafana dashboard (deploy/grafana/weightgen-dashboard.json), checked
//! offline: valid JSON Grafana imports, every query reading only metrics the
//! code exports (`_bucket` only of the histograms exported with buckets),
//! and every exported metric on some panel.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use serde_json::Value;
use weightgen::serve::metrics_http::BUCKETED_HISTOGRAMS;

const PREFIX: &str = "weightgen_";

/// Every `weightgen_…` metric name in `text` (names are `[a-z0-9_]`).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let preceded_by_name = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_name {
            names.push(tail[..len].to_owned());
        }
        rest = &tail[len..];
    }
    names
}

/// The metric names the code records: every `"weightgen_…"` string literal
/// under `src/`.
fn exported_metrics(dir: &Path, names: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            exported_metrics(&path, names);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for literal in text.split('"').skip(1).step_by(2) {
                if literal.starts_with(PREFIX) && metric_names(literal) == [literal] {
                    names.insert(literal.to_owned());
                }
            }
        }
    }
}

#[test]
fn every_dashboard_query_reads_a_metric_the_server_exports_and_every_metric_has_a_panel() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text =
        std::fs::read_to_string(root.join("deploy/grafana/weightgen-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    // The file a user imports is the one the kustomize component ships to
    // Grafana's dashboard sidecar.
    let component = root.join("deploy/k8s/components/grafana-dashboard");
    assert_eq!(
        std::fs::read_to_string(component.join("weightgen-dashboard.json")).unwrap(),
        text
    );
    let kustomization = std::fs::read_to_string(component.join("kustomization.yaml")).unwrap();
    for line in ["- weightgen-dashboard.json", "grafana_dashboard: \"1\""] {
        assert!(kustomization.contains(line), "{kustomization}");
    }
    let mut exported = BTreeSet::new();
    exported_metrics(&root.join("src"), &mut exported);
    assert!(
        exported.contains("weightgen_grpc_requests_total"),
        "{exported:?}"
    );
    let bucketed: HashSet<&str> = BUCKETED_HISTOGRAMS.iter().map(|(n, _)| *n).collect();
    for name in &bucketed {
        assert!(
            exported.contains(*name),
            "{name} has buckets but is not recorded"
        );
    }

    assert_eq!(dashboard["uid"], "weightgen-overview");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "job"]);

    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = HashSet::new();
    let mut read = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: id reused"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the grid");
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            !panel["description"].as_str().unwrap_or_default().is_empty(),
            "{title}: no description"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let opened = expr.matches('(').count();
            assert_eq!(opened, expr.matches(')').count(), "{title}: {expr}");
            assert_eq!(expr.matches('{').count(), expr.matches('}').count());
            assert!(
                expr.contains("job=~\"$job\""),
                "{title}: not filtered by $job"
            );
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr}");
            for name in names {
                let metric = if let Some(base) = name.strip_suffix("_bucket") {
                    assert!(bucketed.contains(base), "{title}: {base} has no buckets");
                    base.to_owned()
                } else {
                    assert!(
                        !bucketed.contains(name.as_str()),
                        "{title}: {name} is a histogram; read its _bucket series"
                    );
                    name
                };
                assert!(
                    exported.contains(&metric),
                    "{title}: {metric} is not recorded by the code ({exported:?})"
                );
                read.insert(metric);
            }
        }
    }
    let missing: Vec<_> = exported.difference(&read).collect();
    assert!(missing.is_empty(), "metrics on no panel: {missing:?}");
}

#[test]
fn metric_names_are_read_whole() {
    assert_eq!(
        metric_names("sum(rate(weightgen_a_total{x=\"1\"}[5m])) / my_weightgen_b"),
        ["weightgen_a_total"]
    );
}
