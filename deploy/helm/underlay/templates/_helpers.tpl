{{/* The image reference of both workloads: repository:tag, pinned by @digest when one is given. */}}
{{- define "underlay.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- with .Values.image.digest }}@{{ . }}{{ end }}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "underlay.labels" -}}
app.kubernetes.io/name: underlay
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: underlay
{{- end -}}

{{/* Fails rendering on a mode the chart does not know. */}}
{{- define "underlay.mode" -}}
{{- if not (has .Values.mode (list "routed" "eni")) -}}
{{- fail (printf "mode must be routed or eni, not %q" .Values.mode) -}}
{{- end -}}
{{ .Values.mode }}
{{- end -}}
