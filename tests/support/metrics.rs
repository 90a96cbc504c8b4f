//! `/metrics` as the tests read it: one fetch of the Prometheus text exposition and one parser.

/// `GET <admin>/metrics` (an admin base URL such as `http://127.0.0.1:9090`) as text; fails the
/// test unless it answers 200.
pub async fn fetch(admin_base: &str) -> String {
    let r = super::client()
        .get(format!("{admin_base}/metrics"))
        .send()
        .await
        .expect("the admin port answers /metrics");
    assert_eq!(r.status(), 200, "/metrics");
    r.text().await.expect("the /metrics text")
}

/// Every sample of `name` as (the label set with its braces, or "" when it has none, value).
/// `name` may carry a complete label set (`name{reason="x"}`): then only that series matches.
pub fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let (labels, value) = rest.rsplit_once(' ')?;
        Some((labels, value.parse::<f64>().ok()?))
    })
}

/// The sum of every series of `name`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    samples(text, name).map(|(_, v)| v).sum()
}

/// The value of the first series of `name` whose labels contain every one of `labels`
/// (each written as in the exposition: `backend="default/r/0"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    samples(text, name)
        .find(|(l, _)| labels.iter().all(|want| l.contains(want)))
        .map(|(_, v)| v)
}
