//! The ValidatingAdmissionPolicy that lets an agent write only its own node's record, evaluated as the API server
//! would: its CEL expressions are loaded from the checked-in `deploy/underlay.yaml` (the rendered chart, itself
//! drift-tested in `deploy.rs`) and run with a CEL evaluator on admission-request-shaped inputs (`request`,
//! `object`, `oldObject`). A request is admitted when a match condition is false (the policy does not apply) or
//! every validation is true.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

const AGENT: &str = "system:serviceaccount:kube-system:underlay-agent";
const CONTROLLER: &str = "system:serviceaccount:kube-system:underlay-controller";
const NODE_CLAIM: &str = "authentication.kubernetes.io/node-name";

struct Policy {
    match_conditions: Vec<String>,
    validations: Vec<(String, String)>,
}

fn policy() -> Policy {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/underlay.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    let vap = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("a ValidatingAdmissionPolicy in deploy/underlay.yaml");
    let name = &vap["metadata"]["name"];
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .expect("its binding");
    assert_eq!(&binding["spec"]["policyName"], name);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(vap["spec"]["failurePolicy"], "Fail");
    let rules = &vap["spec"]["matchConstraints"]["resourceRules"][0];
    assert_eq!(
        rules["resources"],
        json!(["underlaynodes", "underlaynodes/status"])
    );
    let exprs = |key: &str| -> Vec<Value> {
        vap["spec"][key]
            .as_array()
            .unwrap_or_else(|| panic!("spec.{key}"))
            .clone()
    };
    Policy {
        match_conditions: exprs("matchConditions")
            .iter()
            .map(|c| c["expression"].as_str().unwrap().to_string())
            .collect(),
        validations: exprs("validations")
            .iter()
            .map(|v| {
                (
                    v["expression"].as_str().unwrap().to_string(),
                    v["message"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
    }
}

fn eval(expr: &str, input: &Value) -> bool {
    let program = cel::Program::compile(expr).unwrap_or_else(|e| panic!("{expr}: {e:?}"));
    let mut ctx = cel::Context::default();
    for key in ["request", "object", "oldObject"] {
        ctx.add_variable(key, cel::to_value(&input[key]).unwrap())
            .unwrap();
    }
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(b)) => b,
        other => panic!("{expr}: not a bool: {other:?}"),
    }
}

/// `Ok(())` when admitted, else the messages of the failed validations.
fn admit(p: &Policy, input: &Value) -> Result<(), Vec<String>> {
    if !p.match_conditions.iter().all(|c| eval(c, input)) {
        return Ok(());
    }
    let failed: Vec<String> = p
        .validations
        .iter()
        .filter(|(e, _)| !eval(e, input))
        .map(|(_, m)| m.clone())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

fn record(node: &str, status: Value) -> Value {
    json!({
        "apiVersion": "underlay.dev/v1alpha1",
        "kind": "UnderlayNode",
        "metadata": { "name": node },
        "spec": { "instanceId": "i-1", "subnetId": "subnet-1", "zone": "a", "mode": "routed",
                  "nodeIp": "198.18.0.10", "primaryEniId": "eni-1" },
        "status": status,
    })
}

fn controller_status() -> Value {
    json!({
        "pool": { "block": "100.64.0.0/26", "enis": [], "releaseGeneration": 0 },
        "poolSize": 64,
        "routes": [{ "destination": "100.64.0.64/26", "via": "198.18.0.11" }],
        "forwarder": { "routes": [{ "routeTableId": "rtb-1", "destination": "100.64.0.0/24" }] },
    })
}

/// An UPDATE of `node`'s status by `user`, whose token is bound to `bound` (no claim when `None`), turning
/// `old` status into `new`.
fn update(user: &str, bound: Option<&str>, node: &str, old: Value, new: Value) -> Value {
    let mut extra = serde_json::Map::new();
    if let Some(b) = bound {
        extra.insert(NODE_CLAIM.into(), json!([b]));
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            json!(["underlay-agent-x"]),
        );
    }
    json!({
        "request": {
            "operation": "UPDATE",
            "name": node,
            "subResource": "status",
            "userInfo": { "username": user, "groups": ["system:serviceaccounts"], "extra": extra },
        },
        "object": record(node, new),
        "oldObject": record(node, old),
    })
}

fn agent_report(mut status: Value, used: u64) -> Value {
    status["poolUsed"] = json!(used);
    status["conditions"] = json!([{ "type": "Ready", "status": "True" }]);
    status["observedGeneration"] = json!(1);
    status
}

#[test]
fn an_agent_writes_its_own_nodes_report() {
    let p = policy();
    let old = controller_status();
    let new = agent_report(old.clone(), 7);
    assert_eq!(
        admit(&p, &update(AGENT, Some("node-a"), "node-a", old, new)),
        Ok(())
    );
    // Its first report, before the controller wrote anything.
    let input = update(
        AGENT,
        Some("node-a"),
        "node-a",
        json!({}),
        agent_report(json!({}), 0),
    );
    assert_eq!(admit(&p, &input), Ok(()));
}

#[test]
fn an_agent_is_refused_another_nodes_record() {
    let p = policy();
    let old = controller_status();
    let new = agent_report(old.clone(), 7);
    let err = admit(
        &p,
        &update(AGENT, Some("node-a"), "node-b", old.clone(), new.clone()),
    )
    .unwrap_err();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("its own node"), "{err:?}");
    // A token without the node claim (not node-bound) is refused too: fail closed.
    assert!(admit(&p, &update(AGENT, None, "node-a", old, new)).is_err());
}

#[test]
fn an_agent_is_refused_the_controllers_fields() {
    let p = policy();
    let old = controller_status();
    let changes: [(&str, Value, &str); 5] = [
        (
            "pool",
            json!({ "block": "100.64.9.0/26", "enis": [], "releaseGeneration": 0 }),
            "status.pool",
        ),
        ("poolSize", json!(4096), "status.poolSize"),
        ("routes", json!([]), "status.routes"),
        ("forwarder", json!({ "routes": [] }), "status.forwarder"),
        // Taking a forwarder role it never had.
        ("forwarder", Value::Null, "status.forwarder"),
    ];
    for (field, value, message) in changes {
        let mut new = agent_report(old.clone(), 1);
        if value.is_null() {
            new.as_object_mut().unwrap().remove(field);
        } else {
            new[field] = value;
        }
        let err = admit(
            &p,
            &update(AGENT, Some("node-a"), "node-a", old.clone(), new),
        )
        .unwrap_err();
        assert_eq!(err.len(), 1, "{field}: {err:?}");
        assert!(err[0].starts_with(message), "{field}: {err:?}");
    }
    // Adding a pool to a record that had none.
    let new = agent_report(controller_status(), 0);
    let err = admit(&p, &update(AGENT, Some("node-a"), "node-a", json!({}), new)).unwrap_err();
    assert!(err.iter().any(|m| m.starts_with("status.pool")), "{err:?}");
}

#[test]
fn an_agent_may_not_create_delete_or_write_the_spec() {
    let p = policy();
    for (op, sub) in [("CREATE", ""), ("DELETE", ""), ("UPDATE", "")] {
        let mut input = update(
            AGENT,
            Some("node-a"),
            "node-a",
            controller_status(),
            controller_status(),
        );
        input["request"]["operation"] = json!(op);
        input["request"]["subResource"] = json!(sub);
        let err = admit(&p, &input).unwrap_err();
        assert!(
            err.iter().any(|m| m.contains("only update")),
            "{op}: {err:?}"
        );
    }
}

#[test]
fn the_policy_does_not_apply_to_the_controller() {
    let p = policy();
    // The controller writes every node's pool, with no node-bound token.
    let input = update(CONTROLLER, None, "node-b", json!({}), controller_status());
    assert_eq!(admit(&p, &input), Ok(()));
    // Nor to another namespace's ServiceAccount of the same name.
    let input = update(
        "system:serviceaccount:default:underlay-agent",
        None,
        "node-b",
        json!({}),
        controller_status(),
    );
    assert_eq!(admit(&p, &input), Ok(()));
}
