//! The one place that describes EC2 instances for the controller: in chunks of [`DESCRIBE_CHUNK`] ids, all at
//! once (they draw from the same large bucket), and one by one within a chunk EC2 refuses because one of its ids
//! is unknown.

use underlay_cloud::{Cloud, CloudError, Instance, InstanceFilter, InstanceId};

/// Instance ids per DescribeInstances call (EC2 takes up to 200 values per filter).
pub const DESCRIBE_CHUNK: usize = 100;

/// The instances among `ids` EC2 knows (unknown ids are left out; a terminated instance is described as such).
pub async fn describe_instances(
    cloud: &dyn Cloud,
    ids: &[InstanceId],
) -> Result<Vec<Instance>, CloudError> {
    let chunks =
        futures::future::join_all(ids.chunks(DESCRIBE_CHUNK).map(|c| describe_chunk(cloud, c)))
            .await;
    let mut found = Vec::with_capacity(ids.len());
    for chunk in chunks {
        found.extend(chunk?);
    }
    Ok(found)
}

/// DescribeInstances for some ids. EC2 fails the whole call when one id is unknown; then ask one by one.
async fn describe_chunk(
    cloud: &dyn Cloud,
    ids: &[InstanceId],
) -> Result<Vec<Instance>, CloudError> {
    let filter = InstanceFilter {
        ids: ids.to_vec(),
        vpc: None,
    };
    match cloud.describe_instances(&filter).await {
        Err(e) if e.is_not_found() => {
            let mut found = Vec::new();
            for id in ids {
                let one = InstanceFilter {
                    ids: vec![id.clone()],
                    vpc: None,
                };
                match cloud.describe_instances(&one).await {
                    Ok(i) => found.extend(i),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(found)
        }
        other => other,
    }
}
