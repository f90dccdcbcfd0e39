//! A JSON Schema compiled into the grammar a reply is held to: the kinds of value each place
//! takes, an object's properties in the schema's order, enums and consts as their JSON texts.
//! Keywords that restrict values in ways the grammar cannot hold (`pattern`, `minimum`, …) are
//! refused, named, rather than ignored: the reply would break the schema. The grammar may
//! produce fewer documents than the schema allows (no properties it does not list, no
//! alternatives that begin alike), never more.

pub use super::grammar::{
    Grammar, Node, NodeId, Prop, ANY, ANY_ARRAY, ANY_OBJECT, LITERALS, MAX_DEPTH,
};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Keywords that describe and do not restrict: read past.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
    "strict",
];

/// Most properties one object may list, and values one enum (they are tracked as bits).
pub const MAX_PROPS: usize = 64;
/// Longest key or enum value, in bytes (the recogniser counts them in 16 bits).
const MAX_TEXT: usize = 4096;
/// Deepest a schema nests, references followed.
const MAX_SCHEMA_DEPTH: usize = 64;
/// The keywords held to.
const KEYWORDS: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "items",
    "minItems",
    "maxItems",
    "anyOf",
    "oneOf",
    "nullable",
    "$ref",
    "additionalProperties",
];
const MAX_NODES: usize = 4096;

impl Grammar {
    /// The grammar of `schema`, whose root must be an object; the error says which keyword
    /// at which place cannot be held to.
    pub fn from_schema(schema: &Value) -> Result<Self, String> {
        let mut c = Compiler {
            root: schema,
            grammar: Self::any_object(),
            refs: HashMap::new(),
            depth: 0,
        };
        c.grammar.nodes[0] = Node::Any;
        let root = c.node(schema, "#")?;
        let root_node = c.grammar.nodes[root as usize].clone();
        if !matches!(root_node, Node::Object { .. }) {
            return Err("the schema's root must be an object (`\"type\": \"object\"`)".into());
        }
        c.grammar.nodes[0] = root_node;
        let grammar = Self::of(c.grammar.nodes);
        if grammar.need[0] as usize > MAX_DEPTH {
            return Err(format!(
                "the schema's required values nest more than {MAX_DEPTH} deep (objects, \
                 arrays, strings and numbers each a level), deeper than a reply may go here"
            ));
        }
        Ok(grammar)
    }
}

struct Compiler<'a> {
    root: &'a Value,
    grammar: Grammar,
    /// `$ref` targets already given a node (recursive schemas refer back to them).
    refs: HashMap<String, NodeId>,
    /// How deep [`Compiler::node`] is.
    depth: usize,
}

impl Compiler<'_> {
    fn push(&mut self, node: Node) -> Result<NodeId, String> {
        if self.grammar.nodes.len() >= MAX_NODES {
            return Err(format!("the schema is too large (over {MAX_NODES} parts)"));
        }
        self.grammar.nodes.push(node);
        Ok((self.grammar.nodes.len() - 1) as NodeId)
    }

    fn node(&mut self, s: &Value, at: &str) -> Result<NodeId, String> {
        // A chain of references is followed by recursion: bounded, or a request could
        // overflow the stack.
        self.depth += 1;
        let id = if self.depth > MAX_SCHEMA_DEPTH {
            Err(format!(
                "{at}: the schema nests deeper than {MAX_SCHEMA_DEPTH}"
            ))
        } else {
            self.node_at(s, at)
        };
        self.depth -= 1;
        id
    }

    fn node_at(&mut self, s: &Value, at: &str) -> Result<NodeId, String> {
        let m = match s {
            Value::Bool(true) => return Ok(ANY),
            Value::Object(m) => m,
            _ => return Err(format!("{at}: a schema must be an object")),
        };
        let restricting: Vec<&str> = m
            .keys()
            .map(String::as_str)
            .filter(|k| !ANNOTATIONS.contains(k))
            .collect();
        if let Some(key) = restricting.iter().find(|k| !KEYWORDS.contains(k)) {
            return Err(format!(
                "{at}: `{key}` is not supported (a reply cannot be held to it here)"
            ));
        }
        // What stands alone: another keyword beside it would be dropped.
        for (alone, beside) in [
            ("$ref", &[][..]),
            ("anyOf", &[][..]),
            ("oneOf", &[][..]),
            ("const", &["type", "nullable"][..]),
            ("enum", &["type", "nullable"][..]),
        ] {
            if !m.contains_key(alone) {
                continue;
            }
            if let Some(other) = restricting
                .iter()
                .find(|k| **k != alone && !beside.contains(k))
            {
                return Err(format!(
                    "{at}: `{other}` beside `{alone}` is not supported; put it inside, or \
                     give one of them"
                ));
            }
        }
        if let Some(r) = m.get("$ref") {
            return self.reference(r, at);
        }
        let values = match (m.get("const"), m.get("enum")) {
            (Some(v), _) => Some(vec![v.clone()]),
            (None, Some(Value::Array(values))) => Some(values.clone()),
            (None, Some(_)) => return Err(format!("{at}: `enum` must be an array")),
            (None, None) => None,
        };
        if let Some(values) = values {
            return self.texts(values, m, at);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(v) = m.get(key) {
                let Value::Array(alts) = v else {
                    return Err(format!("{at}: `{key}` must be an array"));
                };
                let mut ids = vec![];
                for (i, alt) in alts.iter().enumerate() {
                    ids.push(self.node(alt, &format!("{at}/{key}/{i}"))?);
                }
                return self.one_of(ids, at);
            }
        }
        let mut types = types(m, at)?;
        if types.is_empty() {
            // No `type`: the keywords say which, where they do.
            let object = ["properties", "required"]
                .iter()
                .any(|k| m.contains_key(*k));
            let array = ["items", "minItems", "maxItems"]
                .iter()
                .any(|k| m.contains_key(*k));
            types = match (object, array) {
                (true, true) => {
                    return Err(format!(
                        "{at}: object and array keywords with no `type`; give the type"
                    ))
                }
                (true, false) => vec!["object"],
                (false, true) => vec!["array"],
                (false, false) => return Ok(ANY),
            };
        }
        let mut ids = vec![];
        for t in types {
            ids.push(self.typed(t, m, at)?);
        }
        match ids.as_slice() {
            [one] => Ok(*one),
            _ => self.one_of(ids, at),
        }
    }

    /// An enum's or a const's values, each as its JSON text, of the `type` given beside.
    fn texts(
        &mut self,
        values: Vec<Value>,
        m: &Map<String, Value>,
        at: &str,
    ) -> Result<NodeId, String> {
        if values.is_empty() {
            return Err(format!("{at}: `enum` is empty; nothing could be written"));
        }
        if values.len() > MAX_PROPS {
            return Err(format!("{at}: `enum` has more than {MAX_PROPS} values"));
        }
        let types = types(m, at)?;
        let mut texts = vec![];
        for v in values {
            if !types.is_empty() && !types.iter().any(|t| is_of_type(&v, t)) {
                return Err(format!(
                    "{at}: the value {v} is not of the `type` beside it"
                ));
            }
            if !exact(&v) {
                return Err(format!(
                    "{at}: the number in {v} is too large to be written exactly"
                ));
            }
            let text = v.to_string();
            if text.len() > MAX_TEXT {
                return Err(format!("{at}: a value over {MAX_TEXT} bytes long"));
            }
            texts.push(text);
        }
        self.push(Node::Texts(texts))
    }

    fn typed(&mut self, t: &str, m: &Map<String, Value>, at: &str) -> Result<NodeId, String> {
        let node = match t {
            "string" => Node::String,
            "integer" => Node::Integer,
            "number" => Node::Number,
            "boolean" => Node::Texts(vec!["true".into(), "false".into()]),
            "null" => Node::Texts(vec!["null".into()]),
            "array" => {
                let items = match m.get("items") {
                    None => ANY,
                    Some(s) => self.node(s, &format!("{at}/items"))?,
                };
                let count = |key: &str| match m.get(key) {
                    None => Ok(None),
                    Some(v) => v
                        .as_u64()
                        .map(|n| Some(n as usize))
                        .ok_or_else(|| format!("{at}: `{key}` must be a count")),
                };
                let (min, max) = (count("minItems")?.unwrap_or(0), count("maxItems")?);
                if max.is_some_and(|max| max < min) {
                    return Err(format!("{at}: `maxItems` is below `minItems`"));
                }
                Node::Array { items, min, max }
            }
            "object" => self.object(m, at)?,
            other => return Err(format!("{at}: unknown type `{other}`")),
        };
        self.push(node)
    }

    fn object(&mut self, m: &Map<String, Value>, at: &str) -> Result<Node, String> {
        let required: Vec<&str> = match m.get("required") {
            None => vec![],
            Some(Value::Array(r)) => r
                .iter()
                .map(|n| {
                    n.as_str()
                        .ok_or_else(|| format!("{at}: `required` lists {n}, not a name"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("{at}: `required` must be an array of names")),
        };
        // Left out or true, keys the schema does not list are allowed (and none is written
        // where it lists some); false allows none; a schema for them is not held to.
        let others = match m.get("additionalProperties") {
            None | Some(Value::Bool(true)) => true,
            Some(Value::Bool(false)) => false,
            Some(_) => {
                return Err(format!(
                    "{at}: `additionalProperties` as a schema is not supported (true or false)"
                ))
            }
        };
        let empty = serde_json::Map::new();
        let props = match m.get("properties") {
            Some(Value::Object(props)) => props,
            None => &empty,
            Some(_) => return Err(format!("{at}: `properties` must be an object")),
        };
        if props.is_empty() && required.is_empty() {
            return Ok(Node::Object {
                props: vec![],
                free: others,
            });
        }
        if props.len() > MAX_PROPS {
            return Err(format!("{at}: more than {MAX_PROPS} properties"));
        }
        if let Some(missing) = required.iter().find(|r| !props.contains_key(**r)) {
            return Err(format!(
                "{at}: `{missing}` is required but not among the properties"
            ));
        }
        let mut out = vec![];
        for (name, s) in props {
            let value = self.node(s, &format!("{at}/properties/{name}"))?;
            out.push(Prop {
                key: Value::String(name.clone()).to_string(),
                value,
                required: required.contains(&name.as_str()),
            });
        }
        Ok(Node::Object {
            props: out,
            free: false,
        })
    }

    fn reference(&mut self, r: &Value, at: &str) -> Result<NodeId, String> {
        let Some(path) = r.as_str() else {
            return Err(format!("{at}: `$ref` must be a string"));
        };
        if let Some(&id) = self.refs.get(path) {
            return Ok(id);
        }
        let target = path
            .strip_prefix('#')
            .and_then(|p| self.root.pointer(p))
            .ok_or_else(|| format!("{at}: `$ref` {path} does not name a part of this schema"))?;
        // A place for it first, so that a schema that refers back to itself finds it: of
        // its kind, so that alternatives beside it (an optional recursive field's null) are
        // told apart from it.
        let placeholder = match target.get("type").and_then(Value::as_str) {
            Some("object") => Node::Object {
                props: vec![],
                free: false,
            },
            Some("array") => Node::Array {
                items: ANY,
                min: 0,
                max: None,
            },
            Some("string") => Node::String,
            _ => Node::Any,
        };
        let id = self.push(placeholder)?;
        self.refs.insert(path.to_string(), id);
        let inner = self.node(target, path)?;
        self.grammar.nodes[id as usize] = self.grammar.nodes[inner as usize].clone();
        Ok(id)
    }

    /// Alternatives told apart by their first character; two that may begin alike (two
    /// objects, a string and a string enum) are refused.
    fn one_of(&mut self, ids: Vec<NodeId>, at: &str) -> Result<NodeId, String> {
        let mut seen: Vec<char> = vec![];
        for &id in &ids {
            let firsts = self.first_chars(id, 0);
            if firsts.iter().any(|c| seen.contains(c)) {
                return Err(format!(
                    "{at}: alternatives that can begin alike (two of the same type) are not \
                     supported"
                ));
            }
            seen.extend(firsts);
        }
        self.push(Node::OneOf(ids))
    }

    /// The characters a value of `id` can begin with.
    fn first_chars(&self, id: NodeId, depth: usize) -> Vec<char> {
        const NUMBER: &str = "-0123456789";
        match &self.grammar.nodes[id as usize] {
            _ if depth > 32 => vec![],
            Node::Any => "{[\"tfn".chars().chain(NUMBER.chars()).collect(),
            Node::Integer | Node::Number => NUMBER.chars().collect(),
            Node::String => vec!['"'],
            Node::Texts(t) => t.iter().filter_map(|t| t.chars().next()).collect(),
            Node::Array { .. } => vec!['['],
            Node::Object { .. } => vec!['{'],
            Node::OneOf(ids) => ids
                .iter()
                .flat_map(|&i| self.first_chars(i, depth + 1))
                .collect(),
        }
    }
}

/// The types `type` (and `nullable`) name, each once; `number` takes in `integer`.
fn types<'m>(m: &'m Map<String, Value>, at: &str) -> Result<Vec<&'m str>, String> {
    let mut types: Vec<&str> = match m.get("type") {
        None => vec![],
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts
            .iter()
            .map(|t| {
                t.as_str()
                    .ok_or_else(|| format!("{at}: `type` lists something that is not a name"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(format!("{at}: `type` must be a string or an array")),
    };
    if m.get("nullable") == Some(&Value::Bool(true)) {
        types.push("null");
    }
    if types.contains(&"number") {
        types.retain(|t| *t != "integer");
    }
    let mut seen = vec![];
    types.retain(|t| {
        let first = !seen.contains(t);
        seen.push(*t);
        first
    });
    if m.contains_key("type") && types.is_empty() {
        return Err(format!("{at}: `type` names no type"));
    }
    Ok(types)
}

fn is_of_type(v: &Value, t: &str) -> bool {
    match t {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        _ => false,
    }
}

/// Whether every number in `v` is written as given: a float beyond 2^53 was an integer the
/// JSON reader could not hold (99999999999999999999 reads as 1e20).
fn exact(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.abs() < 9.0e15)
        }
        Value::Array(a) => a.iter().all(exact),
        Value::Object(o) => o.values().all(exact),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schemas_compile_or_are_refused_naming_the_place() {
        let g = Grammar::from_schema(&json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "who"},
                "age": {"type": ["integer", "null"]},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                "owner": {"$ref": "#/$defs/Person"}
            },
            "required": ["name", "age"],
            "$defs": {"Person": {"type": "object", "properties": {
                "name": {"const": "x"}, "friend": {"$ref": "#/$defs/Person"}}}}
        }))
        .unwrap();
        let Node::Object { props, free } = &g.nodes[0] else {
            panic!("{g:?}")
        };
        assert!(!free);
        let keys: Vec<&str> = props.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["\"name\"", "\"age\"", "\"tags\"", "\"owner\""]);
        assert!(props[0].required && props[1].required && !props[2].required);
        // A recursive model with an optional field of its own kind, as pydantic writes one.
        let tree = Grammar::from_schema(&json!({
            "$defs": {"Node": {"type": "object", "properties": {
                "value": {"type": "integer"},
                "child": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
                "required": ["value", "child"]}},
            "$ref": "#/$defs/Node"
        }))
        .unwrap();
        // No `type`: object keywords make an object, array ones an array; false for other
        // keys allows none; integer with number is a number.
        let inferred = Grammar::from_schema(&json!({"type": "object", "properties": {
            "cat": {"properties": {"age": {"type": "integer"}}, "required": ["age"]},
            "ages": {"items": {"type": "integer"}},
            "none": {"type": "object", "additionalProperties": false},
            "n": {"type": ["integer", "number"]}}}))
        .unwrap();
        let takes = |text: &str| {
            let mut w = crate::infer::shape::walk::Walker::new(&inferred);
            w.push_str(text) && w.is_complete()
        };
        assert!(takes(
            r#"{"cat": {"age": 3}, "ages": [1], "none": {}, "n": 1.5}"#
        ));
        for bad in [
            r#"{"cat": {"name": "Tom"}}"#,
            r#"{"ages": ["old"]}"#,
            r#"{"none": {"a": 1}}"#,
        ] {
            assert!(!takes(bad), "{bad}");
        }
        // A chain of references deeper than the stack is refused, not followed.
        let mut defs = serde_json::Map::new();
        for i in 0..3000 {
            let next =
                json!({"anyOf": [{"$ref": format!("#/$defs/A{}", i + 1)}, {"type": "null"}]});
            defs.insert(format!("A{i}"), json!({"type": "array", "items": next}));
        }
        defs.insert("A3000".into(), json!({"type": "string"}));
        let chain = json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/A0"}},
            "$defs": defs});
        let e = Grammar::from_schema(&chain).unwrap_err();
        assert!(e.contains("nests deeper than"), "{e}");
        let mut w = crate::infer::shape::walk::Walker::new(&tree);
        assert!(w.push_str(r#"{"value": 1, "child": {"value": 2, "child": null}}"#));
        assert!(w.is_complete());
        for (schema, says) in [
            (json!({"type": "string"}), "root must be an object"),
            (
                json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}),
                "#/properties/a: `pattern` is not supported",
            ),
            (
                json!({"type": "object", "properties": {"a": {"anyOf": [
                    {"type": "object"}, {"type": "object", "properties": {}}]}}}),
                "#/properties/a: alternatives that can begin alike",
            ),
            (
                json!({"type": "object", "properties": {}, "required": ["b"]}),
                "`b` is required",
            ),
            (
                json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/None"}}}),
                "does not name a part",
            ),
            (
                json!({"type": "object", "properties": {"a": {"enum": []}}}),
                "`enum` is empty",
            ),
            // Beside what stands alone, a keyword would be dropped.
            (
                json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/S",
                    "maxLength": 2}}, "$defs": {"S": {"type": "string"}}}),
                "#/properties/a: `maxLength` is not supported",
            ),
            (
                json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/S",
                    "const": "ok"}}, "$defs": {"S": {"type": "string"}}}),
                "`const` beside `$ref`",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "integer",
                    "anyOf": [{"type": "string"}]}}}),
                "`type` beside `anyOf`",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "string",
                    "enum": [1, 2]}}}),
                "the value 1 is not of the `type`",
            ),
            (
                serde_json::from_str(
                    r#"{"type": "object", "properties": {"a": {"const": 99999999999999999999}}}"#,
                )
                .unwrap(),
                "too large to be written exactly",
            ),
            (
                json!({"type": "object", "additionalProperties": {"type": "integer"}}),
                "`additionalProperties` as a schema",
            ),
            (
                json!({"type": "object", "required": ["name"]}),
                "`name` is required but not among",
            ),
            (
                json!({"type": "object", "required": [1]}),
                "`required` lists 1",
            ),
        ] {
            let e = Grammar::from_schema(&schema).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
