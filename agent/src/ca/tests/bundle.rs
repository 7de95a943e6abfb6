//! The trust bundle stays published: applied again after it was written, so a ConfigMap deleted
//! or edited by hand comes back without a CA restart.

use super::*;

#[tokio::test(start_paused = true)]
async fn the_bundle_is_applied_again_after_it_was_published() {
    let (api, client) = FakeApi::start();
    let publisher = tokio::spawn(super::super::publish_bundle(
        client,
        "ambit-system".into(),
        "ambit-ca-root-cert".into(),
        "BUNDLE".into(),
    ));
    let fake = api.clone();
    eventually("the bundle is published", || {
        !fake.lock().configmaps.is_empty()
    })
    .await;
    // Someone deletes it (the fake keeps only what was applied; forget that).
    api.lock().configmaps.clear();
    let fake = api.clone();
    eventually("the bundle is applied again", || {
        !fake.lock().configmaps.is_empty()
    })
    .await;
    let applied = api.lock().configmaps.clone();
    assert_eq!(applied[0]["data"][BUNDLE_KEY], "BUNDLE", "{applied:?}");
    assert_eq!(applied[0]["metadata"]["name"], "ambit-ca-root-cert");
    publisher.abort();
}
